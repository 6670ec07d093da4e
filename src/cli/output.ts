// What the console prints: aligned tables for people, exact API JSON for scripts.
// Sizes are humanised in binary units and times are shown in the local time zone, because the
// API speaks bytes and ISO UTC while a person reads "1.5 GiB" and "14:02 today".

/** Where the console writes; the program passes process streams, tests pass buffers. */
export interface Output {
  out(text: string): void;
  err(text: string): void;
}

export const processOutput: Output = {
  out: (text) => process.stdout.write(text),
  err: (text) => process.stderr.write(text),
};

/** Prints a value as the API returned it (two-space indent, one trailing newline). */
export function printJson(output: Output, value: unknown): void {
  output.out(JSON.stringify(value, null, 2) + '\n');
}

const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/** 1536 -> "1.5 KiB"; undefined/null -> "-". Three significant digits, binary units. */
export function humanSize(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return '-';
  let value = Math.abs(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const sign = bytes < 0 ? '-' : '';
  if (unit === 0) return `${sign}${value} B`;
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${sign}${value.toFixed(digits)} ${units[unit]}`;
}

/** Bytes per second as "12.3 MiB/s". */
export function humanRate(bytesPerSecond: number | null | undefined): string {
  if (bytesPerSecond === null || bytesPerSecond === undefined) return '-';
  return `${humanSize(bytesPerSecond)}/s`;
}

/** Seconds as "42s", "3m05s", "2h07m". */
export function humanDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return '-';
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** An ISO time as "YYYY-MM-DD HH:MM:SS" in the local time zone; "-" when absent or invalid. */
export function localTime(iso: string | number | Date | null | undefined): string {
  if (iso === null || iso === undefined || iso === '') return '-';
  const d = iso instanceof Date ? iso : new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return (
    `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ` +
    `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`
  );
}

export interface Column<T> {
  header: string;
  value: (row: T) => string | number | boolean | readonly string[] | null | undefined;
  /** Numbers and sizes read better right-aligned. */
  align?: 'left' | 'right';
}

/** Renders rows as a table with aligned columns and a header; "(none)" for no rows. */
export function formatTable<T>(rows: readonly T[], columns: ReadonlyArray<Column<T>>): string {
  if (rows.length === 0) return '(none)\n';
  const cells = rows.map((row) => columns.map((c) => cellText(c.value(row))));
  const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((r) => r[i]!.length)));
  const line = (values: string[]): string =>
    values
      .map((v, i) => {
        const last = i === values.length - 1;
        if (columns[i]!.align === 'right') return v.padStart(widths[i]!);
        return last ? v : v.padEnd(widths[i]!);
      })
      .join('  ')
      .trimEnd() + '\n';
  return line(columns.map((c) => c.header.toUpperCase())) + cells.map(line).join('');
}

/** Renders one object as "key: value" lines with aligned values. */
export function formatFields(fields: ReadonlyArray<[string, unknown]>): string {
  const width = Math.max(...fields.map(([k]) => k.length));
  return fields.map(([k, v]) => `${(k + ':').padEnd(width + 1)} ${cellText(v)}`.trimEnd() + '\n').join('');
}

function cellText(v: unknown): string {
  if (v === null || v === undefined || v === '') return '-';
  if (Array.isArray(v)) return v.length === 0 ? '-' : v.map((x) => cellText(x)).join(', ');
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'bigint') return v.toString();
  return JSON.stringify(v) ?? '-';
}
