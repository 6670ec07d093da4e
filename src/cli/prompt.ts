// Asking the person at the terminal: a line, a password without echo, a yes/no question.
// Scripts never get here: every prompt has a flag (--user, --password-stdin, --ca-fingerprint).
import { createInterface } from 'node:readline';
import { BulwarkError } from '../common/errors.js';

function requireTty(what: string, flag: string): void {
  if (!process.stdin.isTTY) {
    throw new BulwarkError(`${what} is needed and standard input is not a terminal`, { kind: 'invalid', hint: `pass ${flag}` });
  }
}

/** Reads one line from the terminal, echoed. */
export async function askLine(question: string, flag: string): Promise<string> {
  requireTty(question.replace(/:\s*$/, ''), flag);
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    return await new Promise<string>((resolve) => rl.question(question, resolve));
  } finally {
    rl.close();
  }
}

/** Reads a password from the terminal in raw mode, without echo. */
export async function askPassword(question: string, flag: string): Promise<string> {
  requireTty('a password', flag);
  const stdin = process.stdin;
  process.stderr.write(question);
  stdin.setRawMode(true);
  stdin.resume();
  stdin.setEncoding('utf8');
  try {
    return await new Promise<string>((resolve, reject) => {
      let value = '';
      const onData = (chunk: string): void => {
        for (const ch of chunk) {
          switch (ch) {
            case '\r':
            case '\n':
            case '\u0004':
              stdin.off('data', onData);
              resolve(value);
              return;
            case '\u0003':
              stdin.off('data', onData);
              reject(new BulwarkError('interrupted', { kind: 'invalid' }));
              return;
            case '\u007f':
            case '\b':
              value = value.slice(0, -1);
              break;
            default:
              value += ch;
          }
        }
      };
      stdin.on('data', onData);
    });
  } finally {
    stdin.setRawMode(false);
    stdin.pause();
    process.stderr.write('\n');
  }
}

/** Asks a yes/no question on the terminal; only "y"/"yes" is yes. */
export async function askYesNo(question: string, flag: string): Promise<boolean> {
  const answer = await askLine(`${question} [y/N] `, flag);
  return /^y(es)?$/i.test(answer.trim());
}

/** All of standard input, without the trailing newline (for --password-stdin). */
export async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
}
