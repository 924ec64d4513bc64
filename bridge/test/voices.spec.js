// Voices: voices.json in R2 (seeded per test, reset after), created clips, their use in speech.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { call, expectError, jobs, speech, tinyWav, uniqueText } from "./helpers.js";

const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };
const NARRATOR_CLIP = tinyWav(1200);

beforeEach(async () => {
  await env.VOICES.put(
    "voices.json",
    JSON.stringify({
      voices: {
        alloy: "Alice",
        echo: { preset: "Frank", name: "Echo (Frank)" },
        narrator: { clip: "clips/narrator.wav", name: "Narrator" },
        remote: { url: "https://voices.example/remote.wav" },
      },
    }),
  );
  await env.VOICES.put("clips/narrator.wav", NARRATOR_CLIP);
});
afterEach(() => reset());

function wavForm(name, bytes = tinyWav(), field = "audio_sample") {
  const form = new FormData();
  form.append("name", name);
  form.append(field, new File([bytes], "sample.wav", { type: "audio/wav" }));
  return form;
}

const createVoice = (body, options = {}) => call("/v1/audio/voices", { method: "POST", body, ...options });

// What the worker downloads from a voice_url (a signed URL to this bridge; no token).
async function fetchClip(url) {
  const response = await call(url.pathname + url.search, { auth: false });
  expect(response.status).toBe(200);
  return new Uint8Array(await response.arrayBuffer());
}

// A signed clip URL (path and query) that expires `seconds` from now.
async function clipUrlFor(key, seconds) {
  const { clipUrl } = await import("../src/clips.js");
  const { loadConfig } = await import("../src/config.js");
  const url = new URL(await clipUrl(key, loadConfig(env), seconds));
  return url.pathname + url.search;
}
const b64 = (bytes) => btoa(String.fromCharCode(...bytes));

describe("GET /v1/audio/voices", () => {
  it("lists voices.json in file order, then created voices", async () => {
    const created = await (await createVoice(wavForm("Mine"))).json();
    const response = await call("/v1/audio/voices");
    expect(response.status).toBe(200);
    const body = await response.json();
    expect(body.voices.map((voice) => [voice.id, voice.name])).toEqual([
      ["alloy", "alloy"],
      ["echo", "Echo (Frank)"],
      ["narrator", "Narrator"],
      ["remote", "remote"],
      [created.id, "Mine"],
    ]);
    expect(body.voices[0]).toMatchObject({ object: "audio.voice", type: "preset" });
    expect(body.data).toEqual(body.voices);
  });

  it("lists the endpoint's presets after voices.json, once each", async () => {
    const presets = { envOverrides: { PRESET_VOICES: "en-Alice_woman,ALLOY,en-Frank_man" } };
    const voices = (await (await call("/v1/audio/voices", presets)).json()).voices;
    expect(voices.map((voice) => [voice.id, voice.type])).toEqual([
      ["alloy", "preset"],
      ["echo", "preset"],
      ["narrator", "audio_sample"],
      ["remote", "audio_sample"],
      ["en-Alice_woman", "preset"],
      ["en-Frank_man", "preset"],
    ]);
  });

  it("answers without a token (as Open WebUI asks), with presets only; created voices need the token", async () => {
    const created = await (await createVoice(wavForm("Private"))).json();
    const presets = { PRESET_VOICES: "en-Alice_woman" };
    const open = await call("/v1/audio/voices", { auth: false, envOverrides: presets });
    expect(open.status).toBe(200);
    const ids = (await open.json()).voices.map((voice) => voice.id);
    expect(ids).toEqual(["alloy", "echo", "narrator", "remote", "en-Alice_woman"]);
    expect(JSON.stringify(ids)).not.toContain(created.id);
    const withToken = (await (await call("/v1/audio/voices", { envOverrides: presets })).json()).voices;
    expect(withToken.map((voice) => voice.id)).toContain(created.id);
    // A wrong token is still wrong; PUBLIC_LISTINGS=false closes the listing.
    await expectError(await call("/v1/audio/voices", { auth: false, headers: { authorization: "Bearer no" } }), 401);
    await expectError(await call("/v1/audio/voices", { auth: false, envOverrides: { PUBLIC_LISTINGS: "false" } }), 401);
    // One voice, creating and deleting stay behind the token.
    await expectError(await call(`/v1/audio/voices/${created.id}`, { auth: false }), 401);
    await expectError(await createVoice(wavForm("Anonymous"), { auth: false }), 401);
  });

  it("lists nothing without voices.json, and says so when voices.json is broken", async () => {
    await env.VOICES.delete("voices.json");
    expect((await (await call("/v1/audio/voices")).json()).voices).toEqual([]);
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { bad: { preset: "A", clip: "b" } } }));
    await expectError(await call("/v1/audio/voices"), 500, { code: "bad_voices_config", message: /exactly one of/ });
    await env.VOICES.put("voices.json", "{not json");
    await expectError(await call("/v1/audio/voices"), 500, { code: "bad_voices_config", message: /not JSON/ });
  });

  it("reads voices.json through a cache, and re-reads it for an unknown voice id", async () => {
    const cached = { envOverrides: { VOICES_CACHE_SECONDS: "60", STREAM_AUDIO: "false" } };
    expect((await (await call("/v1/audio/voices", cached)).json()).voices).toHaveLength(4);
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { alloy: "Alice", newcomer: "Frank" } }));
    expect((await (await call("/v1/audio/voices", cached)).json()).voices).toHaveLength(4); // from the cache

    const text = uniqueText();
    const response = await speech({ input: text, voice: { id: "newcomer" } }, cached);
    expect(response.status).toBe(200);
    expect((await jobs(text))[0].input.speaker).toBe("Frank");
    expect((await (await call("/v1/audio/voices", cached)).json()).voices.map((v) => v.id)).toEqual([
      "alloy",
      "newcomer",
    ]);
  });

  it("works without a bucket: nothing listed, creating refused", async () => {
    const noBucket = { envOverrides: { VOICES: undefined } };
    expect((await (await call("/v1/audio/voices", noBucket)).json()).voices).toEqual([]);
    await expectError(await createVoice(wavForm("x"), noBucket), 503, { code: "not_configured" });
  });
});

describe("voices in speech requests", () => {
  const cases = [
    ["alloy", { speaker: "Alice" }],
    ["ALLOY", { speaker: "Alice" }],
    [{ id: "echo" }, { speaker: "Frank" }],
    ["remote", { voice_url: "https://voices.example/remote.wav" }],
    ["en-Carter_man", { speaker: "en-Carter_man" }], // not mapped: a worker preset name
  ];
  for (const [voice, expected] of cases) {
    it(`sends ${JSON.stringify(voice)} as ${JSON.stringify(expected)}`, async () => {
      const text = uniqueText();
      expect((await speech({ input: text, voice }, WHOLE)).status).toBe(200);
      const [job] = await jobs(text);
      expect(job.input).toMatchObject(expected);
      for (const field of ["speaker", "voice_url", "voice_audio_base64"]) {
        if (!(field in expected)) expect(job.input).not.toHaveProperty(field);
      }
    });
  }

  it("sends a stored clip as a signed URL to the bridge, which serves the clip until it expires", async () => {
    const text = uniqueText();
    expect((await speech({ input: text, voice: "narrator" }, WHOLE)).status).toBe(200);
    const [job] = await jobs(text);
    expect(job.input).not.toHaveProperty("voice_audio_base64");
    const url = new URL(job.input.voice_url);
    expect(url.origin).toBe("http://bridge.test");
    expect(url.pathname).toBe("/voice-clips/clips%2Fnarrator.wav");
    // Valid as long as the job may live (its TTL: JOB_TIMEOUT_SECONDS + TTL_MARGIN_SECONDS).
    expect(Number(url.searchParams.get("expires")) - Date.now() / 1000).toBeCloseTo(930, -1); // the job's TTL
    expect(await fetchClip(url)).toEqual(NARRATOR_CLIP);

    const forged = new URL(url);
    forged.searchParams.set("expires", String(Number(url.searchParams.get("expires")) + 1));
    await expectError(await call(forged.pathname + forged.search, { auth: false }), 403, { code: "invalid_signature" });
    const elsewhere = new URL(url);
    elsewhere.pathname = "/voice-clips/voices.json";
    await expectError(await call(elsewhere.pathname + elsewhere.search, { auth: false }), 403);
    const expired = await clipUrlFor("clips/narrator.wav", -10);
    await expectError(await call(expired, { auth: false }), 403, { code: "expired" });
  });

  it("points clip URLs at PUBLIC_URL when set", async () => {
    const text = uniqueText();
    await speech(
      { input: text, voice: "narrator" },
      { envOverrides: { ...WHOLE.envOverrides, PUBLIC_URL: "https://tts.example/" } },
    );
    expect((await jobs(text))[0].input.voice_url).toMatch(/^https:\/\/tts\.example\/voice-clips\//);
  });

  it("answers 404 for an unknown voice id", async () => {
    await expectError(await speech({ input: uniqueText(), voice: { id: "voice_0123456789abcdef01234567" } }), 404, {
      param: "voice",
      code: "voice_not_found",
    });
    await expectError(await speech({ input: uniqueText(), voice: "voice_0123456789abcdef01234567" }), 404, {
      param: "voice",
    });
    await expectError(await speech({ input: uniqueText(), voice: { id: "nobody" } }), 404, { param: "voice" });
    await env.VOICES.delete("clips/narrator.wav");
    await expectError(await speech({ input: uniqueText(), voice: "narrator" }), 404, { param: "voice" });
  });
});

describe("POST /v1/audio/voices", () => {
  it("stores a multipart clip and makes it usable at once, by id object or string", async () => {
    const clip = tinyWav(3000);
    const response = await createVoice(wavForm("Grandpa", clip));
    expect(response.status).toBe(200);
    const voice = await response.json();
    expect(voice).toMatchObject({ object: "audio.voice", name: "Grandpa", type: "audio_sample" });
    expect(voice.id).toMatch(/^voice_[0-9a-f]{24}$/);
    expect(Math.abs(voice.created_at - Date.now() / 1000)).toBeLessThan(60);

    const stored = await env.VOICES.get(`clips/${voice.id}`);
    expect(new Uint8Array(await stored.arrayBuffer())).toEqual(clip);
    expect(stored.customMetadata).toEqual({
      name: "Grandpa",
      format: "wav",
      owner: "default", // AUTH_TOKEN's owner
      created_at: String(voice.created_at),
    });

    for (const reference of [{ id: voice.id }, voice.id]) {
      const text = uniqueText();
      expect((await speech({ input: text, voice: reference }, WHOLE)).status).toBe(200);
      const [job] = await jobs(text);
      expect(await fetchClip(new URL(job.input.voice_url))).toEqual(clip);
      expect(job.input).not.toHaveProperty("speaker");
    }
    expect(await (await call(`/v1/audio/voices/${voice.id}`)).json()).toMatchObject({ id: voice.id, name: "Grandpa" });
  });

  it("accepts JSON with base64 audio, and the field names file and audio in forms", async () => {
    const clip = tinyWav(100);
    const fromJson = await createVoice({ name: "Json voice", audio_sample: b64(clip) });
    expect(fromJson.status).toBe(200);
    const dataUrl = await createVoice({ name: "Data URL", audio_base64: `data:audio/wav;base64,${b64(clip)}` });
    expect(dataUrl.status).toBe(200);
    expect((await createVoice(wavForm("File field", clip, "file"))).status).toBe(200);
    const names = (await (await call("/v1/audio/voices")).json()).voices.map((voice) => voice.name);
    expect(names).toEqual(expect.arrayContaining(["Json voice", "Data URL", "File field"]));
  });

  it("gives every voice its own id", async () => {
    const ids = new Set();
    for (let i = 0; i < 5; i++) ids.add((await (await createVoice(wavForm("Same name"))).json()).id);
    expect(ids.size).toBe(5);
  });

  it("recognises the audio containers the worker decodes", async () => {
    const heads = {
      flac: [0x66, 0x4c, 0x61, 0x43],
      ogg: [0x4f, 0x67, 0x67, 0x53],
      mp3: [0x49, 0x44, 0x33, 0x04],
      mp3frame: [0xff, 0xfb, 0x90, 0x64],
      m4a: [0, 0, 0, 0x20, 0x66, 0x74, 0x79, 0x70],
    };
    for (const [kind, head] of Object.entries(heads)) {
      const clip = new Uint8Array(2000);
      clip.set(head);
      const response = await createVoice(wavForm(kind, clip));
      expect(response.status, kind).toBe(200);
    }
  });

  it("refuses bad voices with 400, 413 or 415-like 400s naming the field", async () => {
    await expectError(await createVoice(wavForm("   ")), 400, { param: "name" });
    await expectError(await createVoice(wavForm("x".repeat(65))), 400, { param: "name" });
    const noFile = new FormData();
    noFile.append("name", "No file");
    await expectError(await createVoice(noFile), 400, { param: "audio_sample" });
    await expectError(await createVoice(wavForm("Text", new TextEncoder().encode("just some text, not audio"))), 400, {
      param: "audio_sample",
      message: /WAV, MP3, FLAC/,
    });
    await expectError(await createVoice({ name: "Bad base64", audio_sample: "***" }), 400, { param: "audio_sample" });
    await expectError(await createVoice({ name: "Designed", type: "prompt", prompt: "a deep voice" }), 400, {
      param: "type",
    });
    await expectError(await createVoice("name=x", { headers: { "content-type": "text/plain" } }), 400, {
      code: "unsupported_content_type",
    });
    const capped = { envOverrides: { MAX_VOICE_BYTES: "2000" } };
    await expectError(await createVoice(wavForm("Too long", tinyWav(1500)), capped), 413, { param: "audio_sample" });
    await expectError(await createVoice(wavForm("Way too long", tinyWav(60_000)), capped), 413, {
      code: "request_too_large",
    });
    expect((await (await call("/v1/audio/voices")).json()).voices).toHaveLength(4); // nothing stored
  });

  it("refuses a stored clip over the size cap when it is used", async () => {
    const text = uniqueText();
    await env.VOICES.put("clips/narrator.wav", tinyWav(5000));
    await expectError(
      await speech({ input: text, voice: "narrator" }, { envOverrides: { MAX_VOICE_BYTES: "2000" } }),
      400,
      {
        param: "voice",
        code: "voice_too_large",
      },
    );
  });
});

describe("DELETE /v1/audio/voices/{id}", () => {
  it("deletes a created voice; it is gone at once", async () => {
    const voice = await (await createVoice(wavForm("Short-lived"))).json();
    const response = await call(`/v1/audio/voices/${voice.id}`, { method: "DELETE" });
    expect(await response.json()).toEqual({ id: voice.id, object: "audio.voice.deleted", deleted: true });
    expect(await env.VOICES.head(`clips/${voice.id}`)).toBeNull();
    await expectError(await speech({ input: uniqueText(), voice: { id: voice.id } }), 404, { param: "voice" });
    await expectError(await call(`/v1/audio/voices/${voice.id}`, { method: "DELETE" }), 404, {
      code: "voice_not_found",
    });
    await expectError(await call(`/v1/audio/voices/${voice.id}`), 404, { code: "voice_not_found" });
  });

  it("leaves voices.json voices to the operator, and answers 404 for unknown ids", async () => {
    await expectError(await call("/v1/audio/voices/alloy", { method: "DELETE" }), 400, { code: "voice_not_deletable" });
    await expectError(await call("/v1/audio/voices/voice_ffffffffffffffffffffffff", { method: "DELETE" }), 404);
    await expectError(await call("/v1/audio/voices/nobody", { method: "DELETE" }), 404);
  });
});
