// A promise settled from outside, for hand-offs between callbacks and awaiting code.
/** A promise settled from outside (the first resolve or reject wins); `settled` says whether it has been. */
export interface Deferred<T> {
  readonly promise: Promise<T>;
  readonly settled: boolean;
  readonly resolve: (v: T) => void;
  readonly reject: (err: unknown) => void;
}

export function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined); // whoever awaits it handles the error; maybe nobody does
  let settled = false;
  return {
    promise,
    get settled() {
      return settled;
    },
    resolve: (v) => {
      settled = true;
      resolve(v);
    },
    reject: (err) => {
      settled = true;
      reject(err);
    },
  };
}
