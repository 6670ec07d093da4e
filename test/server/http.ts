// Minimal HTTP clients for the server's real transports: the unix socket and TLS TCP.
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';

export interface Reply {
  status: number;
  body: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- tests read replies loosely
  json<T = any>(): T;
}

export interface Target {
  socketPath?: string;
  url?: string;
  ca?: string;
}

export function call(target: Target, method: string, path: string, body?: unknown, token?: string): Promise<Reply> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  const headers: Record<string, string> = {};
  if (payload !== undefined) headers['content-type'] = 'application/json';
  if (token) headers.authorization = `Bearer ${token}`;
  return new Promise((resolve, reject) => {
    const onResponse = (res: import('node:http').IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, body: text, json: <T>() => JSON.parse(text) as T });
      });
      res.on('error', reject);
    };
    const req = target.socketPath
      ? httpRequest({ socketPath: target.socketPath, method, path, headers }, onResponse)
      : httpsRequest(new URL(path, target.url), { method, headers, ca: target.ca }, onResponse);
    req.on('error', reject);
    req.end(payload);
  });
}
