// How the API starts and stops job runs. The server wires the job engine (src/server/jobs/)
// behind this interface (EngineJobRunner in engine-stores.ts).

export interface JobRunner {
  /** Starts a session of the job now; refuses (conflict) when the job is running. */
  run(job: string, opts: { full: boolean }): Promise<{ sessionId: string }>;
  /** Stops a running session; the session ends in state `stopped`. */
  stop(sessionId: string, reason: string): Promise<void>;
  close(): Promise<void>;
}
