// The RunPod serverless API as the bridge uses it.
//
//   whole files: POST /runsync (waits up to RUNSYNC_WAIT_SECONDS), then GET /status/{id} while
//                the job is pending, until the job deadline;
//   streaming:   POST /run, then GET /stream/{id} (each reply holds the items yielded since the
//                last one) until a reply with a final status carries no items: RunPod splits
//                backlogs over 1 MB across replies, so the first final reply may not be the last.
//
// Every job carries a `policy`: a TTL a little longer than the bridge waits (a job whose
// cancellation was lost still ends soon after) and an execution timeout from the text's length.
// Submissions are sent once (a lost answer may still have started a job); reads (/status,
// /stream) and /cancel are retried on transient failures with exponential backoff and jitter,
// honouring Retry-After. Polling starts quick and slows to about a second (RunPod allows 2000
// /status and /stream calls per 10 s per endpoint). The API key travels only in the Authorization
// header: it is in no message, log line or response.

import { ApiError, invalid, rateLimited, upstreamFailed, upstreamTimeout } from "./errors.js";
import { EXTRAS } from "./extras.js";
import { formatBytes, fromBase64 } from "./http.js";

// Documented job states; live replies also say IN_PROGRESS.
export const PENDING = new Set(["IN_QUEUE", "RUNNING", "IN_PROGRESS"]);
export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]);

// Answers worth asking again for: RunPod's rate limit and its gateway's passing failures.
const TRANSIENT_STATUS = new Set([408, 425, 429, 500, 502, 503, 504]);
// RunPod's floors: a TTL of at least 10 s, an execution timeout above 5 s.
const MIN_TTL_MS = 10_000;
const MIN_EXECUTION_MS = 6_000;
// A cancellation gets this long in all (Workers run about 30 s after the client has gone).
const CANCEL_BUDGET_MS = 20_000;

// Worker input fields that come from the client, and the OpenAI parameter each one stands for.
// A worker error naming any other field is the bridge's fault, not the client's.
const CLIENT_FIELDS = {
  text: "input",
  input: "input",
  speaker: "voice",
  speakers: "voice",
  voice_audio_base64: "voice",
  voice_url: "voice",
  output_format: "response_format",
  speed: "speed",
  ...Object.fromEntries(Object.keys(EXTRAS).map((name) => [name, name])),
  timestamps: "timestamps",
};

// Worker failures caused by the deployment (storage, bugs, a worker stopped by RunPod), whatever
// fields they quote, and the bridge's own sentence for each: the worker's text may name its
// storage, bucket or internals, so it goes to the bridge's log, never to the client.
const SERVER_FAULTS = [
  [/^internal error/i, "The worker failed while generating the audio; the job was not completed."],
  [
    /^(S3 upload failed|the audio could not be uploaded)/i,
    "The worker could not store the audio; the job was not completed.",
  ],
  [
    /^the encoded audio is/i,
    "The audio is too large for the endpoint to return without storage; ask for a shorter text or a smaller format.",
  ],
  [/^the worker was shut down/i, "The worker was shut down before the job finished; send the request again."],
];
// A streamed job that fails after sending audio says so first; the cause follows.
const AFTER_ITEMS = /^streaming stopped after \d+ item\(s\): /i;

// The client went away (request.signal aborted or a write failed). Nobody reads the answer;
// 499 is the status proxies log for it.
export class CallerGone extends ApiError {
  constructor() {
    super(499, "The client closed the connection.", { code: "client_closed_request" });
    this.name = "CallerGone";
  }
}

export class RunPod {
  constructor(config) {
    this.base = config.runpodEndpointUrl;
    this.apiKey = config.runpodApiKey;
    this.config = config;
  }

  static requireConfigured(config) {
    if (!config.runpodEndpointUrl || !config.runpodApiKey) {
      const missing = [
        config.runpodEndpointUrl ? null : "RUNPOD_ENDPOINT_ID or RUNPOD_ENDPOINT_URL",
        config.runpodApiKey ? null : "RUNPOD_API_KEY",
      ].filter(Boolean);
      throw new ApiError(503, `The bridge is not configured: set ${missing.join(" and ")}.`, {
        code: "not_configured",
      });
    }
  }

  deadline() {
    return Date.now() + this.config.JOB_TIMEOUT_SECONDS * 1000;
  }

  // RunPod's per-job policy: the TTL (queue and execution together) outlives the bridge's own
  // deadline by TTL_MARGIN_SECONDS; the execution timeout grows with the text, up to that deadline.
  policy(characters) {
    const { JOB_TIMEOUT_SECONDS, TTL_MARGIN_SECONDS, EXECUTION_BASE_SECONDS, EXECUTION_SECONDS_PER_CHARACTER } =
      this.config;
    const jobMs = JOB_TIMEOUT_SECONDS * 1000;
    const executionMs = (EXECUTION_BASE_SECONDS + characters * EXECUTION_SECONDS_PER_CHARACTER) * 1000;
    return {
      ttl: Math.max(MIN_TTL_MS, jobMs + TTL_MARGIN_SECONDS * 1000),
      executionTimeout: Math.round(Math.max(MIN_EXECUTION_MS, Math.min(executionMs, jobMs))),
    };
  }

  // Starts a job and returns RunPod's first answer ({id, status, ...}): /runsync for whole files
  // (which may already hold the result), /run for streams. Sent once, never retried.
  async submit(input, { sync, deadline, characters }) {
    const body = { input, policy: this.policy(characters) };
    try {
      if (!sync) return checkJob(await this.send("POST", "/run", { body, deadline }));
      const wait = clamp(Math.min(this.config.RUNSYNC_WAIT_SECONDS * 1000, deadline - Date.now()), 1000, 300_000);
      return checkJob(await this.send("POST", `/runsync?wait=${wait}`, { body, deadline, extraMs: wait }));
    } catch (error) {
      // No job was started: the client may try again once RunPod's Retry-After has passed.
      if (error.status === 429) error.retryable = true;
      throw error;
    }
  }

  // Polls /status until the job ends; returns the COMPLETED job, or throws the error that fits.
  async pollStatus(job, { deadline, signal }) {
    const delays = backoff(this.config.POLL_INITIAL_MS, this.config.POLL_MAX_MS);
    while (!TERMINAL.has(job.status)) {
      if (!PENDING.has(job.status)) throw unknownStatus();
      await this.pause(delays.next().value, deadline, signal);
      job = checkJob(await this.read(`/status/${encodeURIComponent(job.id)}`, { deadline, signal }));
    }
    return settled(job);
  }

  // The items a streaming job yields, in order, until a final reply brings no more.
  async *streamItems(id, { deadline, signal }) {
    const delays = backoff(this.config.STREAM_POLL_INITIAL_MS, this.config.STREAM_POLL_MAX_MS);
    const path = `/stream/${encodeURIComponent(id)}`;
    for (;;) {
      const reply = await this.read(path, { deadline, signal });
      const entries = Array.isArray(reply.stream) ? reply.stream : [];
      for (const entry of entries) {
        const item = entry && typeof entry === "object" && "output" in entry ? entry.output : entry;
        if (item && typeof item === "object" && "error" in item) throw ended(workerError(item.error));
        yield item;
      }
      if (TERMINAL.has(reply.status)) {
        if (entries.length) continue; // a split backlog: read on at once
        if (reply.status !== "COMPLETED") {
          // /stream may not carry the error; /status does.
          const job = reply.error ? reply : await this.read(`/status/${encodeURIComponent(id)}`, { deadline, signal });
          settled({ ...job, status: reply.status });
        }
        return;
      }
      if (!PENDING.has(reply.status)) throw unknownStatus();
      await this.pause(delays.next().value, deadline, signal);
    }
  }

  // Cancels a job; retries transient failures, gives up quietly after CANCEL_ATTEMPTS (the job's
  // TTL then ends it). Never throws. Call it inside ctx.waitUntil.
  async cancel(id, reason) {
    const deadline = Date.now() + CANCEL_BUDGET_MS;
    const path = `/cancel/${encodeURIComponent(id)}`;
    for (let attempt = 1; ; attempt++) {
      try {
        const reply = await this.send("POST", path, { deadline });
        console.warn(`bridge: cancelled job ${id} (${reason}); RunPod says ${String(reply.status).slice(0, 20)}`);
        return true;
      } catch (error) {
        const delay = retryDelay(this.config, attempt, error);
        if (!error.transient || attempt >= this.config.CANCEL_ATTEMPTS || Date.now() + delay >= deadline) {
          console.error(`bridge: could not cancel job ${id} (${reason}): ${error.code || error.name}`);
          return false;
        }
        await sleep(delay);
      }
    }
  }

  // A read-only call (/status, /stream), retried on transient failures.
  async read(path, { deadline, signal }) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.send("GET", path, { deadline, signal });
      } catch (error) {
        const delay = retryDelay(this.config, attempt, error);
        if (!error.transient || attempt > this.config.RETRY_ATTEMPTS || Date.now() + delay >= deadline) throw error;
        console.warn(`bridge: RunPod ${path.split("/")[1]} failed (${error.code}); retry ${attempt} in ${delay} ms`);
        await sleep(delay, signal);
      }
    }
  }

  // Waits `ms` between polls, or fails with 504 when that would pass the job's deadline.
  async pause(ms, deadline, signal) {
    if (Date.now() + ms >= deadline) throw jobTimeout(this.config);
    await sleep(ms, signal);
  }

  // One HTTP call. Errors are ApiErrors; `transient` ones may succeed when asked again.
  async send(method, path, { body, deadline, extraMs = 0, signal } = {}) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw jobTimeout(this.config);
    if (signal?.aborted) throw new CallerGone();
    const timeout = Math.min(this.config.UPSTREAM_TIMEOUT_SECONDS * 1000 + extraMs, remaining);
    const operation = path.split(/[/?]/)[1];
    const signals = [AbortSignal.timeout(timeout), ...(signal ? [signal] : [])];
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        headers: {
          authorization: `Bearer ${this.apiKey}`,
          ...(body === undefined ? {} : { "content-type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.any(signals),
      });
    } catch (error) {
      if (signal?.aborted) throw new CallerGone();
      if (isTimeout(error)) {
        throw transient(upstreamTimeout(`RunPod did not answer /${operation} within ${Math.ceil(timeout / 1000)} s.`));
      }
      throw transient(upstreamFailed(`RunPod could not be reached for /${operation} (network error).`));
    }
    if (!response.ok) {
      await response.body?.cancel().catch(() => {});
      throw httpError(response, operation);
    }
    try {
      const value = await response.json();
      if (value && typeof value === "object" && !Array.isArray(value)) return value;
    } catch (error) {
      if (signal?.aborted) throw new CallerGone();
      // fall through: not JSON
    }
    throw upstreamFailed(`RunPod's answer to /${operation} is not a JSON object.`);
  }

  // The audio of a finished job, as {result, audio: {stream, size}}: a stream of its bytes (from the
  // presigned URL, or the base64 decoded) and its size when known. A download is retried on passing
  // failures within the deadline, refused past MAX_AUDIO_BYTES, and streamed through: the stream
  // fails (the client sees a broken transfer) when the body passes the cap, ends short of its
  // Content-Length, or outlasts the deadline, so a reply is never silently shorter.
  async openAudio(output, deadline, signal) {
    const items = Array.isArray(output) ? output : [output];
    const failed = items.find((item) => item && typeof item === "object" && "error" in item);
    if (failed) throw workerError(failed.error);
    const result = items.findLast((item) => item && typeof item === "object" && (item.audio_url || item.audio_base64));
    if (!result) throw upstreamFailed("The worker's result holds no audio.", "upstream_bad_output");
    if (result.audio_base64) {
      const bytes = fromBase64(result.audio_base64);
      if (!bytes) throw upstreamFailed("The worker's audio_base64 is not valid base64.", "upstream_bad_output");
      return { result, audio: { stream: new Blob([bytes]).stream(), size: bytes.byteLength } };
    }
    const limit = this.config.MAX_AUDIO_BYTES;
    const response = await this.download(result.audio_url, deadline, signal);
    const declared = response.headers.get("content-length");
    const size = declared !== null && /^\d+$/.test(declared) ? Number(declared) : null;
    if (size !== null && size > limit) {
      await response.body?.cancel().catch(() => {});
      throw upstreamFailed(
        `The audio is ${formatBytes(size)}, over the bridge's ${formatBytes(limit)} limit (MAX_AUDIO_BYTES).`,
      );
    }
    return { result, audio: { stream: response.body.pipeThrough(checkedLength(size, limit)), size } };
  }

  // The response of a GET to the presigned URL (its body unread), retried like a read. The URL is
  // a credential of sorts: it stays out of messages and logs.
  async download(url, deadline, signal) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.fetchOnce(url, deadline, signal);
      } catch (error) {
        const delay = retryDelay(this.config, attempt, error);
        if (!error.transient || attempt > this.config.RETRY_ATTEMPTS || Date.now() + delay >= deadline) throw error;
        console.warn(`bridge: downloading the audio failed (${error.code}); retry ${attempt} in ${delay} ms`);
        await sleep(delay, signal);
      }
    }
  }

  // One GET: UPSTREAM_TIMEOUT_SECONDS for the answer to begin, the job's deadline for its body.
  async fetchOnce(url, deadline, signal) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw jobTimeout(this.config);
    const first = new AbortController();
    const timer = setTimeout(
      () => first.abort(new DOMException("timed out", "TimeoutError")),
      Math.min(this.config.UPSTREAM_TIMEOUT_SECONDS * 1000, remaining),
    );
    const signals = [first.signal, AbortSignal.timeout(remaining), ...(signal ? [signal] : [])];
    let response;
    try {
      response = await fetch(url, { signal: AbortSignal.any(signals) });
    } catch (error) {
      if (signal?.aborted) throw new CallerGone();
      if (isTimeout(error))
        throw transient(upstreamTimeout("Downloading the audio from the worker's storage timed out."));
      throw transient(upstreamFailed("Downloading the audio from the worker's storage failed (network error)."));
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      await response.body?.cancel().catch(() => {});
      const error = upstreamFailed(`Downloading the audio from the worker's storage failed (HTTP ${response.status}).`);
      if (TRANSIENT_STATUS.has(response.status)) transient(error);
      throw error;
    }
    return response;
  }
}

// Passes bytes through, failing when they pass `limit` or end short of (or past) `size`.
function checkedLength(size, limit) {
  let seen = 0;
  return new TransformStream({
    transform(chunk, controller) {
      seen += chunk.byteLength;
      if (seen > limit || (size !== null && seen > size)) {
        controller.error(upstreamFailed("The audio from the worker's storage is longer than it should be."));
        return;
      }
      controller.enqueue(chunk);
    },
    flush(controller) {
      if (size !== null && seen !== size) {
        controller.error(upstreamFailed("The audio from the worker's storage ended early.", "upstream_incomplete"));
      }
    },
  });
}

function httpError(response, operation) {
  const status = response.status;
  if (status === 401 || status === 403) {
    return upstreamFailed(`RunPod refused the API key (HTTP ${status}); check RUNPOD_API_KEY.`, "upstream_auth");
  }
  if (status === 429) {
    const waitMs = retryAfterMs(response.headers.get("retry-after"));
    const seconds = Math.max(1, Math.ceil(waitMs / 1000));
    const error = rateLimited(`RunPod is rate-limiting this endpoint; try again in ${seconds} s.`, seconds, false);
    error.retryAfterMs = waitMs;
    return transient(error);
  }
  if (status === 404 && (operation === "status" || operation === "stream")) {
    return upstreamFailed("RunPod no longer knows the job (HTTP 404); its result expired or it never existed.");
  }
  const error = upstreamFailed(`RunPod answered HTTP ${status} to /${operation}.`);
  if (TRANSIENT_STATUS.has(status)) {
    transient(error);
    error.retryAfterMs = retryAfterMs(response.headers.get("retry-after"));
  }
  return error;
}

// Retry-After as seconds or an HTTP date, in milliseconds (0 when absent or unreadable).
export function retryAfterMs(value) {
  if (!value) return 0;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isFinite(date) ? Math.max(0, date - Date.now()) : 0;
}

// Exponential backoff with full jitter, at least what Retry-After asks for.
export function retryDelay(config, attempt, error) {
  const ceiling = Math.min(config.RETRY_MAX_MS, config.RETRY_BASE_MS * 2 ** (attempt - 1));
  const jittered = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  return Math.max(jittered, error?.retryAfterMs || 0);
}

// Poll delays: `initial`, then 1.5 times longer each time, up to `max`.
function* backoff(initial, max) {
  for (let delay = initial; ; delay = Math.min(delay * 1.5, max)) yield Math.round(delay);
}

function transient(error) {
  error.transient = true;
  return error;
}

// A job that has ended on RunPod: there is nothing left to cancel.
function ended(error) {
  error.jobEnded = true;
  return error;
}

function jobTimeout(config) {
  return upstreamTimeout(`The job did not finish within ${config.JOB_TIMEOUT_SECONDS} s; it was cancelled.`);
}

function unknownStatus() {
  return upstreamFailed("RunPod reported an unknown job status.");
}

function checkJob(job) {
  if (typeof job.id !== "string" || !job.id) throw upstreamFailed("RunPod's answer holds no job id.");
  return job;
}

// A finished job as an output, or the ApiError that fits how it ended.
function settled(job) {
  switch (job.status) {
    case "COMPLETED":
      return job;
    case "FAILED":
      throw ended(workerError(job.error));
    case "CANCELLED":
      throw ended(upstreamFailed("The job was cancelled on RunPod.", "upstream_cancelled"));
    case "TIMED_OUT":
      throw ended(upstreamTimeout("The job reached RunPod's time limit (its TTL or execution timeout)."));
    default:
      throw unknownStatus();
  }
}

// The worker's one-sentence error: 400 with `param` when it names a field the client gave,
// else 502. A raised exception arrives as a JSON string with a traceback, which stays out.
export function workerError(error) {
  if (typeof error === "string") {
    const trimmed = error.trim();
    if (trimmed.startsWith("{")) {
      try {
        const details = JSON.parse(trimmed);
        const kind =
          typeof details.error_type === "string" ? details.error_type.replace(/^<class '|'>$/g, "") : "error";
        return upstreamFailed(`The worker failed (${kind.slice(0, 80)}).`, "worker_error");
      } catch {
        // not JSON: a sentence after all
      }
    }
    const message = trimmed.slice(0, 1000) || "The worker failed without a message.";
    const cause = message.replace(AFTER_ITEMS, "");
    const fault = SERVER_FAULTS.find(([pattern]) => pattern.test(cause));
    const field = /'([A-Za-z_][A-Za-z0-9_]*)(?:\[\d+\])?[.'\[]/.exec(cause)?.[1];
    // The worker's one sentence about a field the client gave is the client's to read.
    if (!fault && field && field in CLIENT_FIELDS) return invalid(message, CLIENT_FIELDS[field], "invalid_value");
    console.warn(`bridge: the worker failed the job: ${message.slice(0, 300)}`);
    return upstreamFailed(fault ? fault[1] : "The worker could not run the job.", "worker_error");
  }
  return upstreamFailed("The job failed on RunPod.", "worker_error");
}

export function isTimeout(error) {
  return error?.name === "TimeoutError" || error?.name === "AbortError";
}

// Resolves after `ms`, or rejects with CallerGone as soon as `signal` aborts.
export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new CallerGone());
    const onAbort = () => {
      clearTimeout(timer);
      reject(new CallerGone());
    };
    const timer = setTimeout(
      () => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      },
      Math.max(0, ms),
    );
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function clamp(value, low, high) {
  return Math.min(Math.max(value, low), high);
}
