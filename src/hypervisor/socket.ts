// Socket plumbing shared by the QMP, guest-agent and NBD clients: waiting for a fresh connection
// to open, closing one gracefully (end, then destroy if the peer does not close in time), and
// asking whether anything listens on a unix socket (is that VM's monitor up?).
import net from 'node:net';

/**
 * Resolves once `socket` is connected; rejects with the socket's error (the socket is then
 * destroyed). The caller wraps the error with what it was connecting to.
 */
export async function whenConnected(socket: net.Socket): Promise<void> {
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

/** Ends `socket` and waits for `closed`; destroys it when the peer has not closed within `graceMs`. */
export async function endAndWait(socket: net.Socket, closed: Promise<void>, graceMs = 2000): Promise<void> {
  socket.end();
  const t = setTimeout(() => socket.destroy(), graceMs);
  try {
    await closed;
  } finally {
    clearTimeout(t);
  }
}

/**
 * Whether something accepts connections on the unix socket `socketPath` now: true once a
 * connection opens (it is closed again at once), false on any error (no file, not a socket, nobody
 * listening). Used to tell a running VM from a stopped one by its monitor socket.
 */
export async function socketAnswers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path: socketPath });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
