// Shared by the specs: call the Worker in this isolate, steer the RunPod stand-in, decode answers.
import { env } from "cloudflare:workers";
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import worker from "../worker.js";

export const TOKEN = env.AUTH_TOKEN;
export const RUNPOD_KEY = env.RUNPOD_API_KEY;
const STANDIN = new URL(env.RUNPOD_ENDPOINT_URL).origin;

// Calls the bridge; `envOverrides` replaces bindings (undefined removes one). `signal` becomes
// request.signal: aborting it is the client disconnecting.
export async function call(
  path,
  { method = "GET", body, headers = {}, auth = true, envOverrides = {}, wait = true, signal } = {},
) {
  const init = { method, headers: { ...(auth ? { authorization: `Bearer ${TOKEN}` } : {}), ...headers }, signal };
  if (body !== undefined) {
    if (
      typeof body === "string" ||
      body instanceof Uint8Array ||
      body instanceof FormData ||
      body instanceof ReadableStream
    ) {
      init.body = body;
    } else {
      init.body = JSON.stringify(body);
      init.headers["content-type"] ??= "application/json";
    }
    if (body instanceof ReadableStream) init.duplex = "half";
  }
  const ctx = createExecutionContext();
  const response = await worker.fetch(new Request(`http://bridge.test${path}`, init), { ...env, ...envOverrides }, ctx);
  response.ctx = ctx;
  if (wait) response.settled = () => waitOnExecutionContext(ctx);
  return response;
}

// A speech request whose client can disconnect mid-way: `abort()` aborts request.signal.
// `response` is the bridge's answer (a 499 when the client left before it); `settled()` waits
// for the bridge's background work (the cancellation) to end.
export function disconnectable(body, options = {}) {
  const controller = new AbortController();
  const ctx = createExecutionContext();
  const request = new Request("http://bridge.test/v1/audio/speech", {
    method: "POST",
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "tts-1", voice: "alloy", ...body }),
    signal: controller.signal,
  });
  const response = worker.fetch(request, { ...env, ...(options.envOverrides || {}) }, ctx);
  return { response, abort: () => controller.abort(), settled: () => waitOnExecutionContext(ctx) };
}

export function speech(body, options = {}) {
  return call("/v1/audio/speech", { method: "POST", body: { model: "tts-1", voice: "alloy", ...body }, ...options });
}

let counter = 0;
// A text no other test uses: the stand-in keys plans and records by it.
export function uniqueText(label = "text") {
  return `${label} ${Date.now()}-${++counter}-${Math.random().toString(36).slice(2)}`;
}

export async function plan(text, value) {
  await fetch(`${STANDIN}/__plan`, { method: "POST", body: JSON.stringify({ text, plan: value }) });
}

export async function jobs(text) {
  return (await fetch(`${STANDIN}/__jobs?text=${encodeURIComponent(text)}`)).json();
}

// Submissions for `text` that the stand-in refused before starting a job.
export async function refused(text) {
  return (await (await fetch(`${STANDIN}/__refused?text=${encodeURIComponent(text)}`)).json()).count;
}

// Waits (bounded) until the stand-in has a job for `text` that passes `check`; returns it.
export async function waitForJob(text, check = () => true) {
  for (let i = 0; i < 200; i++) {
    const [job] = await jobs(text);
    if (job && check(job)) return job;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`no job for ${text} reached the expected state`);
}

export async function release(text) {
  await fetch(`${STANDIN}/__release?text=${encodeURIComponent(text)}`, { method: "POST" });
}

export async function expectError(response, status, { param, code, type, message } = {}) {
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`expected an OpenAI error (HTTP ${status}), got HTTP ${response.status}: ${text.slice(0, 200)}`);
  }
  if (response.status !== status) {
    throw new Error(`expected HTTP ${status}, got ${response.status}: ${text.slice(0, 300)}`);
  }
  const error = body.error;
  if (!error || typeof error.message !== "string" || !("param" in error) || !("code" in error) || !("type" in error)) {
    throw new Error(`not an OpenAI error shape: ${text}`);
  }
  if (param !== undefined && error.param !== param) throw new Error(`param ${error.param} != ${param}: ${text}`);
  if (code !== undefined && error.code !== code) throw new Error(`code ${error.code} != ${code}: ${text}`);
  if (type !== undefined && error.type !== type) throw new Error(`type ${error.type} != ${type}: ${text}`);
  if (message !== undefined && !message.test(error.message)) throw new Error(`message ${error.message} !~ ${message}`);
  return error;
}

export const bytesOf = (text) => new TextEncoder().encode(text);
export const textOf = (buffer) => new TextDecoder().decode(buffer);

export function base64(text) {
  return btoa(String.fromCharCode(...bytesOf(text)));
}

// Server-sent events: the JSON of every `data:` line; each block's `event:` line must name its type.
// Comment blocks (": keep-alive") carry no event and are skipped, as every SSE parser skips them.
export function parseSse(text) {
  return text
    .split("\n\n")
    .filter((block) => block.trim() && !block.split("\n").every((line) => line.startsWith(":")))
    .map((block) => {
      const lines = block.split("\n");
      const data = JSON.parse(
        lines
          .filter((line) => line.startsWith("data: "))
          .map((line) => line.slice(6))
          .join("\n"),
      );
      const event = lines.find((line) => line.startsWith("event: "))?.slice(7);
      if (event !== data.type) throw new Error(`event line ${event} does not match the type ${data.type}`);
      return data;
    });
}

// The smallest valid WAV (RIFF header + a few silent samples).
export function tinyWav(samples = 2400) {
  const data = samples * 2;
  const buffer = new ArrayBuffer(44 + data);
  const view = new DataView(buffer);
  const put = (offset, text) => [...text].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  put(0, "RIFF");
  view.setUint32(4, 36 + data, true);
  put(8, "WAVE");
  put(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);
  view.setUint16(22, 1, true);
  view.setUint32(24, 24000, true);
  view.setUint32(28, 48000, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  put(36, "data");
  view.setUint32(40, data, true);
  return new Uint8Array(buffer);
}
