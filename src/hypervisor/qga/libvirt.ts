// The guest agent of a libvirt domain. libvirtd itself is the client of the domain's
// org.qemu.guest_agent.0 channel socket (QEMU accepts one client), so Bulwark cannot connect to
// that socket; it sends each command through libvirt instead (`virsh qemu-agent-command`), which
// also serializes it with libvirt's own agent use. One virsh process per command: fine for the
// few hundred commands of a file restore; a command travels as one argument, so guest-file-write
// carries at most ~90 KiB per command (Linux caps one argument at 128 KiB).
import { BulwarkError } from '../../common/errors.js';
import { ToolError } from '../../common/process.js';
import { attr, elements, startTag } from '../libvirt/virsh.js';
import { Virsh } from '../libvirt/virsh.js';
import { GuestAgent, QgaError, type QgaCallOptions } from './guest-agent.js';

export const AGENT_CHANNEL = 'org.qemu.guest_agent.0';

/** Linux's limit on one command-line argument (MAX_ARG_STRLEN), less room for the JSON around it. */
const MAX_COMMAND_CHARS = 131_072 - 1024;

export interface AgentChannel {
  /** Host end of the channel (libvirt's socket; libvirtd is connected to it). */
  readonly socketPath: string | undefined;
  /** libvirt's view of the guest side: connected once qemu-ga has opened the port in the guest. */
  readonly state: 'connected' | 'disconnected' | undefined;
}

/** The guest agent channel in a domain's XML, if it has one. */
export function agentChannelOf(domainXml: string): AgentChannel | undefined {
  for (const ch of elements(domainXml, 'channel')) {
    const target = startTag(ch, 'target') ?? '';
    if (attr(target, 'name') !== AGENT_CHANNEL) continue;
    const state = attr(target, 'state');
    return {
      socketPath: attr(startTag(ch, 'source') ?? '', 'path'),
      state: state === 'connected' || state === 'disconnected' ? state : undefined,
    };
  }
  return undefined;
}

/** The agent's error description in virsh's words ("unable to execute QEMU agent command 'x': DESC"). */
function agentErrorOf(stderr: string): string | undefined {
  return stderr.match(/unable to execute QEMU agent command '[^']*': ([\s\S]*)$/)?.[1]?.trim();
}

/** A libvirt domain's guest agent, one `virsh qemu-agent-command` per command. */
export class LibvirtGuestAgent extends GuestAgent {
  readonly label: string;
  readonly timeoutMs: number;
  override readonly maxWriteBytes = 90 * 1024;
  readonly #virsh: Virsh;
  readonly #domain: string;

  constructor(o: { uri: string; domain: string; timeoutMs?: number }) {
    super();
    this.#virsh = new Virsh(o.uri);
    this.#domain = o.domain;
    this.label = `${o.domain} (libvirt ${o.uri})`;
    this.timeoutMs = o.timeoutMs ?? 30_000;
  }

  override async execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QgaCallOptions = {}): Promise<T> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const json = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
    if (Buffer.byteLength(json) > MAX_COMMAND_CHARS) {
      throw new QgaError(`guest agent command ${command} for ${this.label} is too large to pass through virsh (${Buffer.byteLength(json)} bytes)`, 'protocol', { agent: this.label, command });
    }
    const wait = timeoutMs > 0 ? ['--timeout', String(Math.max(1, Math.ceil(timeoutMs / 1000)))] : ['--block'];
    let out: string;
    try {
      out = await this.#virsh.run(['qemu-agent-command', this.#domain, json, ...wait], timeoutMs > 0 ? timeoutMs + 10_000 : 0);
    } catch (err) {
      throw this.#failure(command, err, timeoutMs);
    }
    let msg: { return?: unknown; error?: { class?: string; desc?: string } };
    try {
      msg = JSON.parse(out) as typeof msg;
    } catch (err) {
      throw new QgaError(`guest agent command ${command} on ${this.label}: virsh printed something that is not JSON: ${out.slice(0, 200)}`, 'protocol', { agent: this.label, command, cause: err });
    }
    if (msg.error) {
      throw new QgaError(`guest agent command ${command} on ${this.label} failed: ${msg.error.desc ?? 'no description'} (${msg.error.class ?? 'unknown class'})`, 'command', {
        agent: this.label,
        command,
        errorClass: msg.error.class,
        desc: msg.error.desc,
      });
    }
    return msg.return as T;
  }

  /** Nothing stays open: virsh runs per command. */
  override async close(): Promise<void> {}

  #failure(command: string, err: unknown, timeoutMs: number): QgaError {
    const stderr = err instanceof ToolError ? err.stderr.replace(/^error:\s*/gm, '').trim() : '';
    const desc = agentErrorOf(stderr);
    if (desc !== undefined) {
      return new QgaError(`guest agent command ${command} on ${this.label} failed: ${desc}`, 'command', { agent: this.label, command, desc, cause: err });
    }
    if (err instanceof ToolError && err.timedOut) {
      return new QgaError(`guest agent command ${command} on ${this.label} got no answer within ${timeoutMs} ms`, 'timeout', { agent: this.label, command, cause: err, hint: 'is qemu-guest-agent running in the guest?' });
    }
    if (/agent is not responding|agent not available|not connected|didn't respond|timed? ?out/i.test(stderr)) {
      return new QgaError(`the guest agent of ${this.label} does not answer: ${stderr}`, 'timeout', { agent: this.label, command, cause: err, hint: 'is qemu-guest-agent running in the guest?' });
    }
    return new QgaError(`guest agent command ${command} on ${this.label} could not be sent through libvirt: ${stderr || (err instanceof Error ? err.message : String(err))}`, 'connect', {
      agent: this.label,
      command,
      cause: err,
    });
  }
}

/**
 * The agent of a running libvirt domain, checked to answer, or undefined when the connection has
 * no such domain. Refusals say what to do: no agent channel in the domain, domain not running,
 * agent not connected or not answering.
 */
export async function connectLibvirtGuestAgent(o: { uri: string; domain: string; host?: string; timeoutMs?: number }): Promise<LibvirtGuestAgent | undefined> {
  const virsh = new Virsh(o.uri);
  const vm = o.domain;
  const on = o.host !== undefined ? `host ${o.host} (${o.uri})` : o.uri;
  let xml: string;
  let state: string;
  try {
    xml = await virsh.run(['dumpxml', vm]);
    state = (await virsh.run(['domstate', vm])).trim();
  } catch (err) {
    if (err instanceof ToolError && err.kind === 'not-found') return undefined;
    throw err;
  }
  const context = { vm, uri: o.uri };
  const channel = agentChannelOf(xml);
  if (!channel) {
    throw new BulwarkError(`VM ${vm} on ${on} has no guest agent channel (${AGENT_CHANNEL})`, {
      kind: 'unavailable',
      context,
      hint: `add <channel type='unix'><target type='virtio' name='${AGENT_CHANNEL}'/></channel> to its domain (virsh edit ${vm}), restart it with qemu-guest-agent installed in the guest; or restore to a folder with --to`,
    });
  }
  if (state !== 'running') {
    throw new BulwarkError(`VM ${vm} on ${on} is ${state}, not running`, {
      kind: 'conflict',
      context,
      hint: state === 'paused' ? `resume it (virsh resume ${vm}), or restore to a folder with --to` : `start it (virsh start ${vm}) and wait for its guest agent, or restore to a folder with --to`,
    });
  }
  const notAnswering = (cause?: unknown): BulwarkError =>
    new BulwarkError(`the guest agent of VM ${vm} on ${on} does not answer${channel.state === 'disconnected' ? ' (libvirt: channel not connected)' : ''}`, {
      kind: 'unavailable',
      context,
      cause,
      hint: 'start qemu-guest-agent in the guest (systemctl start qemu-guest-agent) or wait until the guest has booted; or restore to a folder with --to',
    });
  if (channel.state === 'disconnected') throw notAnswering();
  const agent = new LibvirtGuestAgent({ uri: o.uri, domain: vm, ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}) });
  try {
    await agent.ping({ timeoutMs: 5000 });
  } catch (err) {
    throw notAnswering(err);
  }
  return agent;
}
