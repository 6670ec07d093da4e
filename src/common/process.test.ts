import { describe, expect, it } from 'vitest';
import { runTool, ToolError } from './process.js';

async function failure(p: Promise<unknown>): Promise<ToolError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(ToolError);
    return err as ToolError;
  }
  throw new Error('expected the tool to fail');
}

describe('runTool', () => {
  it('resolves with stdout', async () => {
    expect(await runTool('sh', ['-c', 'printf "a b\\n"'], 'printing')).toBe('a b\n');
  });

  it('names the action, quotes stderr, keeps the exit code and the command line', async () => {
    const e = await failure(runTool('sh', ['-c', 'echo "disk.img: No such file or directory" >&2; exit 3'], 'qemu-img info of disk vda', { context: { disk: 'vda' } }));
    expect(e.message).toBe('qemu-img info of disk vda failed: disk.img: No such file or directory');
    expect(e.exitCode).toBe(3);
    expect(e.timedOut).toBe(false);
    expect(e.kind).toBe('not-found');
    expect(e.context).toMatchObject({ disk: 'vda', command: expect.stringContaining('sh -c') as unknown });
  });

  it('says when the tool is not installed, and how to get it', async () => {
    const e = await failure(runTool('bulwark-no-such-tool', [], 'probing'));
    expect(e.kind).toBe('unavailable');
    expect(e.message).toContain('bulwark-no-such-tool is not installed');
    expect(e.hint).toContain('scripts/setup.sh');
  });

  it('kills a tool that passes its deadline', async () => {
    const e = await failure(runTool('sleep', ['5'], 'waiting', { timeoutMs: 100 }));
    expect(e.timedOut).toBe(true);
    expect(e.message).toContain('no answer within 100 ms');
  });

  it('uses the kind the caller gives', async () => {
    const e = await failure(runTool('false', [], 'dumping', { kind: 'unavailable', hint: 'is the database up?' }));
    expect(e.kind).toBe('unavailable');
    expect(e.hint).toBe('is the database up?');
  });
});
