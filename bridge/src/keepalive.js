// Keep-alive for server-sent events while a request waits: a job queued behind a cold start can take
// minutes to send its first audio, and proxies and clients close connections that stay silent.
// An SSE comment line (": keep-alive") is ignored by every event parser and keeps the connection busy.

export const KEEP_ALIVE = Symbol("keep-alive");
export const KEEP_ALIVE_COMMENT = ": keep-alive\n\n";

// The values of the async iterator `source`, with KEEP_ALIVE yielded whenever `ms` pass without one.
// The pending `next()` is never dropped: the value it brings is yielded when it comes.
export async function* withKeepAlive(source, ms) {
  let pending = source.next();
  try {
    for (;;) {
      let timer;
      const tick = new Promise((resolve) => {
        timer = setTimeout(resolve, ms, KEEP_ALIVE);
      });
      const result = await Promise.race([pending, tick]).finally(() => clearTimeout(timer));
      if (result === KEEP_ALIVE) {
        yield KEEP_ALIVE;
        continue;
      }
      if (result.done) return;
      pending = null;
      yield result.value;
      pending = source.next();
    }
  } finally {
    // Stopped early (the reply failed or the client left): end the source without waiting for it; a
    // poll in flight ends with the request's signal, and its outcome is no longer wanted.
    pending?.catch(() => {});
    source.return?.()?.catch?.(() => {});
  }
}
