// LVM's config syntax (docs/formats/lvm2-reading.md §5), enough for volume group metadata:
// sections `NAME { ... }`, assignments `KEY = VALUE` with strings, numbers and flat arrays,
// `#` comments. Pure; bounded in depth and size, so hostile text gives an error, not a hang.
import { BulwarkError } from '../../common/errors.js';

export type ConfigScalar = string | number;
export type ConfigValue = ConfigScalar | readonly ConfigScalar[];

/** A section: its assignments and subsections, in text order (names may repeat; the first wins). */
export interface ConfigSection {
  readonly values: ReadonlyMap<string, ConfigValue>;
  readonly sections: ReadonlyMap<string, ConfigSection>;
  /** Subsection names in the order they appear. */
  readonly order: readonly string[];
}

const MAX_DEPTH = 16;
export const MAX_CONFIG_TEXT = 16 * 1024 * 1024;

type Token =
  | { kind: 'word'; text: string; line: number }
  | { kind: 'string'; text: string; line: number }
  | { kind: 'punct'; text: '{' | '}' | '[' | ']' | '=' | ','; line: number }
  | { kind: 'end'; line: number };

function corrupt(message: string, line: number): BulwarkError {
  return new BulwarkError(`LVM metadata text, line ${line}: ${message}`, { kind: 'corrupt', context: { line } });
}

class Lexer {
  #pos = 0;
  #line = 1;
  constructor(private readonly text: string) {}

  next(): Token {
    const t = this.text;
    for (;;) {
      while (this.#pos < t.length && /\s/.test(t[this.#pos]!)) {
        if (t[this.#pos] === '\n') this.#line++;
        this.#pos++;
      }
      if (t[this.#pos] !== '#') break;
      while (this.#pos < t.length && t[this.#pos] !== '\n') this.#pos++;
    }
    const line = this.#line;
    if (this.#pos >= t.length) return { kind: 'end', line };
    const c = t[this.#pos]!;
    if (c === '{' || c === '}' || c === '[' || c === ']' || c === '=' || c === ',') {
      this.#pos++;
      return { kind: 'punct', text: c, line };
    }
    if (c === '"') {
      let out = '';
      this.#pos++;
      for (;;) {
        if (this.#pos >= t.length) throw corrupt('a string is not closed', line);
        const d = t[this.#pos++]!;
        if (d === '"') return { kind: 'string', text: out, line };
        if (d === '\\') {
          if (this.#pos >= t.length) throw corrupt('a string is not closed', line);
          out += t[this.#pos++]!;
          continue;
        }
        if (d === '\n') this.#line++;
        out += d;
      }
    }
    const start = this.#pos;
    while (this.#pos < t.length && !/[\s{}[\]=,"#]/.test(t[this.#pos]!)) this.#pos++;
    return { kind: 'word', text: t.slice(start, this.#pos), line };
  }
}

class Parser {
  readonly #lexer: Lexer;
  #token: Token;
  constructor(text: string) {
    this.#lexer = new Lexer(text);
    this.#token = this.#lexer.next();
  }

  #advance(): Token {
    const t = this.#token;
    this.#token = this.#lexer.next();
    return t;
  }

  #describe(t: Token): string {
    return t.kind === 'end' ? 'the end of the text' : `"${t.text.slice(0, 40)}"`;
  }

  /** A section body up to `}` (or the end of the text at depth 0). */
  section(depth: number): ConfigSection {
    if (depth > MAX_DEPTH) throw corrupt(`sections nested deeper than ${MAX_DEPTH}`, this.#token.line);
    const values = new Map<string, ConfigValue>();
    const sections = new Map<string, ConfigSection>();
    const order: string[] = [];
    for (;;) {
      const t = this.#token;
      if (t.kind === 'end') {
        if (depth > 0) throw corrupt('a section is not closed with }', t.line);
        return { values, sections, order };
      }
      if (t.kind === 'punct' && t.text === '}') {
        if (depth === 0) throw corrupt('} without a section to close', t.line);
        this.#advance();
        return { values, sections, order };
      }
      if (t.kind !== 'word' || t.text === '') throw corrupt(`expected a name, found ${this.#describe(t)}`, t.line);
      this.#advance();
      const after = this.#advance();
      if (after.kind === 'punct' && after.text === '{') {
        const sub = this.section(depth + 1);
        if (!sections.has(t.text)) {
          sections.set(t.text, sub);
          order.push(t.text);
        }
      } else if (after.kind === 'punct' && after.text === '=') {
        const v = this.#value();
        if (!values.has(t.text)) values.set(t.text, v);
      } else {
        throw corrupt(`expected = or { after ${t.text}, found ${this.#describe(after)}`, after.line);
      }
    }
  }

  #value(): ConfigValue {
    const t = this.#advance();
    if (t.kind === 'punct' && t.text === '[') {
      const items: ConfigScalar[] = [];
      if (this.#token.kind === 'punct' && this.#token.text === ']') {
        this.#advance();
        return items;
      }
      for (;;) {
        const item = this.#advance();
        items.push(this.#scalar(item));
        const sep = this.#advance();
        if (sep.kind === 'punct' && sep.text === ']') return items;
        if (!(sep.kind === 'punct' && sep.text === ',')) throw corrupt(`expected , or ] in an array, found ${this.#describe(sep)}`, sep.line);
      }
    }
    return this.#scalar(t);
  }

  #scalar(t: Token): ConfigScalar {
    if (t.kind === 'string') return t.text;
    if (t.kind === 'word' && /^-?\d+(\.\d+)?$/.test(t.text)) return Number(t.text);
    throw corrupt(`expected a string or a number, found ${this.#describe(t)}`, t.line);
  }
}

/** Parses LVM config text; `corrupt` errors name the line. */
export function parseConfig(text: string): ConfigSection {
  if (text.length > MAX_CONFIG_TEXT) throw new BulwarkError(`LVM metadata text of ${text.length} bytes is larger than ${MAX_CONFIG_TEXT}`, { kind: 'corrupt' });
  return new Parser(text).section(0);
}
