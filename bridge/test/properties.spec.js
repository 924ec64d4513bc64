// Property tests (fast-check): generated bodies, raw bodies, headers and paths. Whatever arrives,
// the bridge answers (never an uncaught exception, never a 500), every error is OpenAI-shaped with
// a one-line message, and a refused request never reaches RunPod. Generated sequences of voice and
// consent operations by several keys never let one owner see or change another's. A failure
// prints fast-check's seed and path; run it again with that seed to replay the case.
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

// --- owners -------------------------------------------------------------------------------------

// Generated sequences of voice and consent operations by several keys (owners) on shared storage.
// A model records who made what; after every step no owner lists, reads, uses, renames or
// deletes another's voice or consent (those answer 404 and change nothing), and each owner's
// listings hold exactly its own. Fresh owners per run, so runs do not see each other.
const OWNERS = ["ann", "ben", "cid"];
const operation = fc.record({
  owner: fc.constantFrom(...OWNERS),
  kind: fc.constantFrom(
    "createVoice",
    "createConsent",
    "listVoices",
    "listConsents",
    "getVoice",
    "useVoice",
    "deleteVoice",
    "getConsent",
    "renameConsent",
    "deleteConsent",
  ),
  target: fc.nat(),
});

async function ownerKeys(run) {
  const keys = Object.fromEntries(OWNERS.map((owner) => [owner, `${owner}-${run}-${Math.random()}`]));
  const digests = {};
  for (const [owner, key] of Object.entries(keys)) {
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key));
    digests[`${owner}${run}`] = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  }
  return { keys, env: { API_KEYS: JSON.stringify(digests), STREAM_AUDIO: "false" } };
}

function upload(kind) {
  const form = new FormData();
  form.append("name", `${kind} of someone`);
  if (kind === "consent") form.append("language", "en");
  const wav = new Uint8Array(44 + 400);
  wav.set(new TextEncoder().encode("RIFF"), 0);
  wav.set(new TextEncoder().encode("WAVE"), 8);
  form.append(kind === "consent" ? "recording" : "audio_sample", new File([wav], "a.wav", { type: "audio/wav" }));
  return form;
}

async function step(op, model, session) {
  const as = (extra = {}) => ({
    auth: false,
    headers: { authorization: `Bearer ${session.keys[op.owner]}` },
    envOverrides: session.env,
    ...extra,
  });
  const voices = [...model.voices.entries()];
  const consents = [...model.consents.entries()];
  const pick = (entries) => (entries.length ? entries[op.target % entries.length] : null);
  const voice = pick(voices);
  const consent = pick(consents);
  const foreign = (entry) => entry && entry[1] !== op.owner;
  switch (op.kind) {
    case "createVoice": {
      const response = await call("/v1/audio/voices", as({ method: "POST", body: upload("voice") }));
      expect(response.status).toBe(200);
      model.voices.set((await response.json()).id, op.owner);
      return;
    }
    case "createConsent": {
      const response = await call("/v1/audio/voice_consents", as({ method: "POST", body: upload("consent") }));
      expect(response.status).toBe(200);
      model.consents.set((await response.json()).id, op.owner);
      return;
    }
    case "listVoices": {
      const body = await (await call("/v1/audio/voices", as())).json();
      const listed = body.voices.filter((entry) => entry.id.startsWith("voice_")).map((entry) => entry.id);
      expect(listed.sort()).toEqual(
        voices
          .filter(([, owner]) => owner === op.owner)
          .map(([id]) => id)
          .sort(),
      );
      return;
    }
    case "listConsents": {
      const body = await (await call("/v1/audio/voice_consents?limit=100", as())).json();
      expect(body.data.map((entry) => entry.id).sort()).toEqual(
        consents
          .filter(([, owner]) => owner === op.owner)
          .map(([id]) => id)
          .sort(),
      );
      expect(JSON.stringify(body)).not.toMatch(/owner/);
      return;
    }
    default:
      return targeted(op, { voice, consent, foreign, as, model });
  }
}

async function targeted(op, { voice, consent, foreign, as, model }) {
  const [path, entry, table, request] = {
    getVoice: [`/v1/audio/voices/${voice?.[0]}`, voice, null, {}],
    deleteVoice: [`/v1/audio/voices/${voice?.[0]}`, voice, model.voices, { method: "DELETE" }],
    useVoice: ["/v1/audio/speech", voice, null, { method: "POST", body: speechFor(voice) }],
    getConsent: [`/v1/audio/voice_consents/${consent?.[0]}`, consent, null, {}],
    renameConsent: [`/v1/audio/voice_consents/${consent?.[0]}`, consent, null, { method: "POST", body: { name: "x" } }],
    deleteConsent: [`/v1/audio/voice_consents/${consent?.[0]}`, consent, model.consents, { method: "DELETE" }],
  }[op.kind];
  if (!entry) return;
  const response = await call(path, as(request));
  if (foreign(entry)) {
    expect(response.status).toBe(404); // another owner's: it does not exist for this caller
    await response.arrayBuffer();
    return;
  }
  expect(response.status).toBe(200);
  await response.arrayBuffer();
  await response.settled?.();
  if (table) table.delete(entry[0]);
  if (op.kind === "renameConsent") model.renamed.add(entry[0]); // by its owner only
}

function speechFor(voice) {
  return { model: "tts-1", input: `Owner check ${voice?.[0]}`, voice: { id: voice?.[0] } };
}

describe("generated requests by several keys", { timeout: 300_000 }, () => {
  it("no owner ever sees or changes another's voice or consent (300 generated)", async () => {
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(operation, { minLength: 12, maxLength: 12 }), async (operations) => {
        const session = await ownerKeys(run++);
        const model = { voices: new Map(), consents: new Map(), renamed: new Set() };
        for (const op of operations) await step(op, model, session);
        // In the end every object still exists for its owner, unchanged, whatever the others tried.
        const byOwner = (owner) => ({
          auth: false,
          headers: { authorization: `Bearer ${session.keys[owner]}` },
          envOverrides: session.env,
        });
        for (const [id, owner] of model.voices) {
          expect((await call(`/v1/audio/voices/${id}`, byOwner(owner))).status).toBe(200);
        }
        for (const [id, owner] of model.consents) {
          const consent = await (await call(`/v1/audio/voice_consents/${id}`, byOwner(owner))).json();
          expect(consent.name === "consent of someone" || model.renamed.has(id)).toBe(true);
        }
      }),
      { numRuns: 25 },
    );
  });
});
