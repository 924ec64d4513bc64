// One RunPod job tied to the request that started it: a job never outlives its caller.
//
// The caller is gone when request.signal aborts (the client disconnected; Workers need the
// `enable_request_signal` compatibility flag for that) or when a write to it fails. Then, and
// whenever the bridge stops following a job that has not ended (a deadline, a failed poll, a
// truncated stream), the job is cancelled.
//
// On a disconnect, Workers cancel the request's own work and keep only ctx.waitUntil promises
// alive, for about 30 s. So the tie holds one waitUntil promise from the start until the request
// is done, and everything a cancellation needs (the submission's answer, the /cancel calls) hangs
// off promises, not off the request handler's own awaits.

import { CallerGone, TERMINAL } from "./runpod.js";

export class JobTie {
  constructor(runpod, request, ctx) {
    this.runpod = runpod;
    this.ctx = ctx;
    this.id = null;
    this.ended = false; // the job reached a final state on RunPod
    this.cancelling = null;
    this.submission = null;
    this.done = false;
    // Aborts when the caller goes: polls and sleeps of this request stop at once.
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    const { promise, resolve } = Promise.withResolvers();
    this.release = resolve;
    ctx?.waitUntil?.(promise);
    this.requestSignal = request.signal;
    this.onAbort = () => this.callerGone("the client disconnected");
    if (this.requestSignal?.aborted) this.onAbort();
    else this.requestSignal?.addEventListener?.("abort", this.onAbort);
  }

  get gone() {
    return this.signal.aborted;
  }

  // Starts the job with `start` (a function returning RunPod's first answer). The submission is
  // not interrupted by a disconnect: its answer carries the id that the cancellation needs.
  submit(start) {
    if (this.gone) return Promise.reject(this.signal.reason);
    this.submission = start().then((job) => {
      this.id = job.id;
      if (TERMINAL.has(job.status)) this.ended = true;
      return job;
    });
    this.submission.catch(() => {}); // a failed submission started nothing: nothing to cancel
    return this.submission.then((job) => {
      if (this.gone) throw this.signal.reason;
      return job;
    });
  }

  // The job reached a final state on RunPod (COMPLETED, FAILED, CANCELLED, TIMED_OUT).
  settle() {
    this.ended = true;
  }

  // The caller is gone: cancel the job and stop this request's polling.
  callerGone(reason) {
    if (this.done || this.gone) return;
    this.controller.abort(new CallerGone());
    this.abandon(reason);
  }

  // The bridge stops following the job (`error`: why): cancel it unless it has ended. Idempotent.
  abandon(error) {
    if (this.cancelling || !this.submission || this.ended || error?.jobEnded) return this.cancelling;
    const reason = typeof error === "string" ? error : error?.code || error?.name || "error";
    this.cancelling = this.submission.then(
      (job) => (this.ended ? false : this.runpod.cancel(job.id, reason)),
      () => false,
    );
    this.ctx?.waitUntil?.(this.cancelling);
    return this.cancelling;
  }

  // The request is over (answered, failed, or its stream ended): release the waitUntil hold once
  // any cancellation has run.
  finish() {
    if (this.done) return;
    this.done = true;
    this.requestSignal?.removeEventListener?.("abort", this.onAbort);
    this.release(this.cancelling ?? undefined);
  }
}
