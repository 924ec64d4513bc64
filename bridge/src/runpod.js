// The RunPod serverless API as the bridge uses it.
//
//   whole files: POST /runsync (waits up to RUNSYNC_WAIT_SECONDS), then GET /status/{id} with
//                backoff while the job is queued or running, until the job deadline;
//   streaming:   POST /run, then GET /stream/{id} (each reply holds the items yielded since the
//                last one) until the job ends.
// Every call has its own deadline (UPSTREAM_TIMEOUT_SECONDS, never past the job's deadline);
// a job the bridge gives up on is cancelled. The API key travels only in the Authorization
// header: it is in no message, log line or response.

import { ApiError, invalid, upstreamFailed, upstreamTimeout } from "./errors.js";
import { fromBase64 } from "./http.js";

const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]);
const PENDING = new Set(["IN_QUEUE", "IN_PROGRESS"]);

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
  seed: "seed",
  cfg_scale: "cfg_scale",
  diffusion_steps: "diffusion_steps",
  max_new_tokens: "max_new_tokens",
  stream_chunk_ms: "stream_chunk_ms",
  timestamps: "timestamps",
};

// Worker failures caused by the deployment (storage, bugs, a worker stopped by RunPod), whatever
// fields they quote.
const SERVER_FAULTS = [
  /^internal error/i,
  /^S3 upload failed/i,
  /^the encoded audio is/i,
  /^the worker was shut down/i,
];
// A streamed job that fails after sending audio says so first; the cause follows.
const AFTER_ITEMS = /^streaming stopped after \d+ item\(s\): /i;

export class RunPod {
  constructor(config, ctx) {
    this.base = config.runpodEndpointUrl;
    this.apiKey = config.runpodApiKey;
    this.config = config;
    this.ctx = ctx;
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

  // One job to completion; returns the finished job ({id, output: the worker's yielded items}).
  async runToCompletion(input, deadline) {
    const wait = clamp(Math.min(this.config.RUNSYNC_WAIT_SECONDS * 1000, deadline - Date.now()), 1000, 300_000);
    let job = await this.call("POST", `/runsync?wait=${wait}`, { input }, deadline, wait);
    let delay = this.config.POLL_INITIAL_MS;
    while (PENDING.has(job.status)) {
      const id = jobId(job);
      if (Date.now() + delay >= deadline) {
        this.cancel(id);
        throw upstreamTimeout(`The job did not finish within ${this.config.JOB_TIMEOUT_SECONDS} s; it was cancelled.`);
      }
      await sleep(delay);
      delay = Math.min(delay * 1.5, this.config.POLL_MAX_MS);
      job = await this.call("GET", `/status/${encodeURIComponent(id)}`, undefined, deadline, 0, id);
    }
    return settled(job);
  }

  // Submits a streaming job; returns its id.
  async submit(input, deadline) {
    const job = await this.call("POST", "/run", { input }, deadline);
    if (TERMINAL.has(job.status)) settled(job);
    return jobId(job);
  }

  // The items a streaming job yields, as they arrive. Throws ApiError when the job fails.
  async *streamItems(id, deadline) {
    let delay = this.config.STREAM_POLL_INITIAL_MS;
    const path = `/stream/${encodeURIComponent(id)}`;
    for (;;) {
      const reply = await this.call("GET", path, undefined, deadline, 0, id);
      const entries = Array.isArray(reply.stream) ? reply.stream : [];
      for (const entry of entries) {
        const item = entry && typeof entry === "object" && "output" in entry ? entry.output : entry;
        if (item && typeof item === "object" && "error" in item) throw workerError(item.error);
        yield item;
      }
      if (TERMINAL.has(reply.status)) {
        if (reply.status !== "COMPLETED") {
          // /stream may not carry the error; /status does.
          const job = reply.error
            ? reply
            : await this.call("GET", `/status/${encodeURIComponent(id)}`, undefined, deadline, 0, id);
          settled({ ...job, status: reply.status });
        }
        return;
      }
      if (!PENDING.has(reply.status) && reply.status !== undefined) {
        throw upstreamFailed(`RunPod reported an unknown job status for the stream.`);
      }
      delay = entries.length
        ? this.config.STREAM_POLL_INITIAL_MS
        : Math.min(delay * 1.5, this.config.STREAM_POLL_MAX_MS);
      if (Date.now() + delay >= deadline) {
        this.cancel(id);
        throw upstreamTimeout(`The job did not finish within ${this.config.JOB_TIMEOUT_SECONDS} s; it was cancelled.`);
      }
      await sleep(delay);
    }
  }

  // Best effort, in the background: the client's answer does not wait for it.
  cancel(id) {
    if (!id) return;
    const done = this.call("POST", `/cancel/${encodeURIComponent(id)}`, undefined, Date.now() + 10_000).catch(() => {});
    this.ctx?.waitUntil?.(done);
  }

  // The audio of a finished job: fetched from the presigned URL or decoded from base64.
  async fetchAudio(output, deadline) {
    const items = Array.isArray(output) ? output : [output];
    const failed = items.find((item) => item && typeof item === "object" && "error" in item);
    if (failed) throw workerError(failed.error);
    const result = items.findLast((item) => item && typeof item === "object" && (item.audio_url || item.audio_base64));
    if (!result) throw upstreamFailed("The worker's result holds no audio.", "upstream_bad_output");
    if (result.audio_base64) {
      const bytes = fromBase64(result.audio_base64);
      if (!bytes) throw upstreamFailed("The worker's audio_base64 is not valid base64.", "upstream_bad_output");
      return { bytes, result };
    }
    // The presigned URL is a credential of sorts: it stays out of messages and logs.
    let response;
    const timeout = Math.min(this.config.UPSTREAM_TIMEOUT_SECONDS * 1000, deadline - Date.now());
    try {
      response = await fetch(result.audio_url, { signal: AbortSignal.timeout(Math.max(timeout, 1)) });
      if (!response.ok) {
        throw upstreamFailed(`Downloading the audio from the worker's storage failed (HTTP ${response.status}).`);
      }
      return { bytes: new Uint8Array(await response.arrayBuffer()), result };
    } catch (error) {
      if (error instanceof ApiError) throw error;
      if (isTimeout(error)) throw upstreamTimeout("Downloading the audio from the worker's storage timed out.");
      throw upstreamFailed("Downloading the audio from the worker's storage failed (network error).");
    }
  }

  async call(method, path, body, deadline, extraMs = 0, id = null) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      this.cancel(id);
      throw upstreamTimeout(`The job did not finish within ${this.config.JOB_TIMEOUT_SECONDS} s; it was cancelled.`);
    }
    const timeout = Math.min(this.config.UPSTREAM_TIMEOUT_SECONDS * 1000 + extraMs, remaining);
    const operation = path.split(/[/?]/)[1];
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        headers: {
          authorization: `Bearer ${this.apiKey}`,
          ...(body === undefined ? {} : { "content-type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeout),
      });
    } catch (error) {
      if (isTimeout(error)) {
        this.cancel(id);
        throw upstreamTimeout(`RunPod did not answer /${operation} within ${Math.round(timeout / 1000)} s.`);
      }
      throw upstreamFailed(`RunPod could not be reached for /${operation} (network error).`);
    }
    if (response.status === 401 || response.status === 403) {
      throw upstreamFailed(
        `RunPod refused the API key (HTTP ${response.status}); check RUNPOD_API_KEY.`,
        "upstream_auth",
      );
    }
    if (!response.ok) {
      throw upstreamFailed(`RunPod answered HTTP ${response.status} to /${operation}.`);
    }
    try {
      const value = await response.json();
      if (value && typeof value === "object") return value;
    } catch {
      // fall through
    }
    throw upstreamFailed(`RunPod's answer to /${operation} is not a JSON object.`);
  }
}

function jobId(job) {
  if (typeof job.id !== "string" || !job.id) throw upstreamFailed("RunPod's answer holds no job id.");
  return job.id;
}

// A finished job as an output, or the ApiError that fits how it ended.
function settled(job) {
  switch (job.status) {
    case "COMPLETED":
      return job;
    case "FAILED":
      throw workerError(job.error);
    case "CANCELLED":
      throw upstreamFailed("The job was cancelled on RunPod.", "upstream_cancelled");
    case "TIMED_OUT":
      throw upstreamTimeout("The job reached RunPod's execution timeout.");
    default:
      throw upstreamFailed("RunPod reported an unknown job status.");
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
    if (SERVER_FAULTS.some((pattern) => pattern.test(cause))) return upstreamFailed(message, "worker_error");
    const field = /'([A-Za-z_][A-Za-z0-9_]*)(?:\[\d+\])?[.'\[]/.exec(cause)?.[1];
    if (field && field in CLIENT_FIELDS) return invalid(message, CLIENT_FIELDS[field], "invalid_value");
    return upstreamFailed(`The worker rejected the job: ${message}`, "worker_error");
  }
  return upstreamFailed("The job failed on RunPod.", "worker_error");
}

export function isTimeout(error) {
  return error?.name === "TimeoutError" || error?.name === "AbortError";
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
}

function clamp(value, low, high) {
  return Math.min(Math.max(value, low), high);
}
