// Property tests (fast-check): generated bodies, raw bodies, headers and paths. Whatever arrives,
// the bridge answers (never an uncaught exception, never a 500), every error is OpenAI-shaped with
// a one-line message, and a refused request never reaches RunPod. A failure prints fast-check's
// seed and path; run it again with that seed to replay the case.
// Each test's title says how many requests it generates (the reliability line counts them).
import { reset } from "cloudflare:test";
import fc from "fast-check";
import { afterEach, describe, expect, it, vi } from "vitest";
import { TOKEN, call } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

const FIELDS = ["model", "input", "voice", "response_format", "speed", "instructions", "stream_format"];
const EXTRAS = ["seed", "cfg_scale", "diffusion_steps", "max_new_tokens", "stream_chunk_ms", "stream"];
const value = fc.oneof(
  fc.constantFrom("tts-1", "alloy", "mp3", "wav", "pcm", "sse", "audio", "", " ", "Speaker 1: hi"),
  fc.string({ maxLength: 40 }),
  fc.string({ unit: "binary", maxLength: 40 }),
  fc.integer(),
  fc.double(),
  fc.constantFrom(0, -1, 0.25, 4, 1e308, Number.MAX_SAFE_INTEGER + 2, "5000".repeat(2000)),
  fc.boolean(),
  fc.constant(null),
  fc.anything({ maxDepth: 3 }),
);
// A speech request with some fields right, some wrong, some unknown.
const speechBody = fc.oneof(
  fc.record(Object.fromEntries([...FIELDS, ...EXTRAS].map((name) => [name, value])), { requiredKeys: [] }),
  fc.record({ model: fc.constant("tts-1"), voice: fc.constant("alloy"), input: fc.string({ maxLength: 300 }) }),
  fc.dictionary(fc.string({ maxLength: 12 }), value, { maxKeys: 6 }),
  fc.anything({ maxDepth: 4 }),
);

// Calls to RunPod the bridge makes while `run` runs (the Worker's outgoing fetches to /v2/...).
async function runpodCalls(run) {
  const spy = vi.spyOn(globalThis, "fetch");
  try {
    const result = await run();
    const calls = spy.mock.calls.filter(([target]) => String(target?.url ?? target).includes("/v2/"));
    return [result, calls.length];
  } finally {
    spy.mockRestore();
  }
}

async function expectOpenAIError(response) {
  expect(response.headers.get("content-type")).toBe("application/json");
  const body = await response.json();
  expect(Object.keys(body)).toEqual(["error"]);
  expect(Object.keys(body.error).sort()).toEqual(["code", "message", "param", "type"]);
  expect(typeof body.error.message).toBe("string");
  expect(body.error.message).not.toMatch(/\n|\bat .*\.js|TypeError|ReferenceError/);
  expect(body.error.message).not.toContain(TOKEN);
  return body.error;
}

// Reads the whole answer (a streamed one too), so the request is really finished.
async function finish(response) {
  if (response.status >= 400) return expectOpenAIError(response);
  await response.arrayBuffer();
  await response.settled?.();
  return null;
}

describe("generated requests", { timeout: 120_000 }, () => {
  it("speech bodies get audio or an OpenAI error; refused ones never reach RunPod (400 generated)", async () => {
    let reached = 0;
    await fc.assert(
      fc.asyncProperty(speechBody, async (body) => {
        const [response, calls] = await runpodCalls(() => call("/v1/audio/speech", { method: "POST", body }));
        expect(response.status).not.toBe(500);
        const error = await finish(response);
        if (error && response.status < 500) expect(calls).toBe(0);
        reached += calls > 0;
      }),
      { numRuns: 400 },
    );
    expect(reached).toBeGreaterThan(10); // the valid ones did reach RunPod: the spy sees the calls
  });

  it("raw bodies that are no JSON object are refused before RunPod (200 generated)", async () => {
    const raw = fc.oneof(
      fc.string({ maxLength: 200 }),
      fc.string({ unit: "binary", maxLength: 200 }),
      fc.json().filter((text) => !text.trim().startsWith("{")),
    );
    await fc.assert(
      fc.asyncProperty(raw, fc.constantFrom("application/json", "text/plain", ""), async (body, type) => {
        const headers = type ? { "content-type": type } : {};
        const [response, calls] = await runpodCalls(() => call("/v1/audio/speech", { method: "POST", body, headers }));
        expect(response.status).toBeGreaterThanOrEqual(400);
        expect(response.status).toBeLessThan(500);
        await expectOpenAIError(response);
        expect(calls).toBe(0);
      }),
      { numRuns: 200 },
    );
  });

  it("any headers get an answer, and a wrong token always 401 (200 generated)", async () => {
    const name = fc.stringMatching(/^[a-z][a-z0-9-]{0,20}$/);
    const headerValue = fc.stringMatching(/^[\x20-\x7e]{0,60}$/);
    await fc.assert(
      fc.asyncProperty(fc.dictionary(name, headerValue, { maxKeys: 6 }), headerValue, async (headers, token) => {
        const body = { model: "tts-1", voice: "alloy", input: "Headers." };
        const wrong = token.trim() !== TOKEN;
        const options = {
          method: "POST",
          body,
          auth: false,
          headers: { ...headers, authorization: `Bearer ${token}` },
        };
        const [response, calls] = await runpodCalls(() => call("/v1/audio/speech", options));
        expect(response.status).not.toBe(500);
        await finish(response);
        if (wrong) {
          expect(response.status).toBe(401);
          expect(calls).toBe(0);
        }
      }),
      { numRuns: 200 },
    );
  });

  it("any path and method get an OpenAI answer (300 generated)", async () => {
    const segment = fc.oneof(
      fc.constantFrom("v1", "audio", "speech", "voices", "models", "tts-1", "..", "%2e%2e", "%00", ""),
      fc.stringMatching(/^[A-Za-z0-9._~%-]{0,16}$/),
    );
    const path = fc.array(segment, { maxLength: 5 }).map((parts) => `/${parts.join("/")}`);
    const method = fc.constantFrom("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD");
    await fc.assert(
      fc.asyncProperty(path, method, async (target, verb) => {
        const body = verb === "POST" || verb === "PUT" || verb === "PATCH" ? { input: "x" } : undefined;
        const [response, calls] = await runpodCalls(() => call(target, { method: verb, body }));
        expect(response.status).not.toBe(500);
        if (verb !== "HEAD" && verb !== "OPTIONS") await finish(response);
        if (!/^\/v1\/audio\/speech\/?$/.test(target)) expect(calls).toBe(0);
      }),
      { numRuns: 300 },
    );
  });
});
