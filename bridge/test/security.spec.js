// A public endpoint's bridge: closed without a key, keys with owners kept apart (admins see all),
// clip URLs in their own trust domain, consent that binds, quotas and bounded listings, results
// streamed through within a cap, and headers that keep answers out of shared caches.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { TOKEN, call, expectError, jobs, plan, release, speech, textOf, tinyWav, uniqueText } from "./helpers.js";
import { KEYS, bearer } from "./owners.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };
const as = (owner, options = {}) => ({ auth: false, ...options, headers: { ...bearer(owner), ...options.headers } });

function voiceForm(name, consent) {
  const form = new FormData();
  form.append("name", name);
  if (consent) form.append("consent", consent);
  form.append("audio_sample", new File([tinyWav(600)], "sample.wav", { type: "audio/wav" }));
  return form;
}

function consentForm(name = "Consent") {
  const form = new FormData();
  form.append("name", name);
  form.append("language", "en-US");
  form.append("recording", new File([tinyWav(300)], "consent.wav", { type: "audio/wav" }));
  return form;
}

const createVoice = async (owner, name, consent, options = {}) =>
  call("/v1/audio/voices", { method: "POST", body: voiceForm(name, consent), ...as(owner, options) });
const createConsent = async (owner, options = {}) =>
  call("/v1/audio/voice_consents", { method: "POST", body: consentForm(), ...as(owner, options) });

describe("closed by default", () => {
  const noKeys = { AUTH_TOKEN: undefined, API_KEYS: undefined };

  it("refuses every route but the public ones, naming the missing secret", async () => {
    for (const [method, path] of [
      ["POST", "/v1/audio/speech"],
      ["GET", "/v1/audio/voice_consents"],
      ["POST", "/v1/audio/voices"],
      ["DELETE", "/v1/audio/voices/voice_0123456789abcdef01234567"],
      ["GET", "/v1/audio/voices/alloy"],
      ["GET", "/nowhere"],
    ]) {
      for (const headers of [{}, { authorization: "Bearer anything" }]) {
        const response = await call(path, { method, auth: false, headers, envOverrides: noKeys });
        await expectError(response, 503, { code: "not_configured", message: /AUTH_TOKEN or API_KEYS/ });
      }
    }
    // The public routes still answer: health, the page, preflights, and the preset listings.
    for (const path of ["/health", "/", "/v1/models", "/v1/audio/voices"]) {
      expect((await call(path, { auth: false, envOverrides: noKeys })).status, path).toBe(200);
    }
    const preflight = await call("/v1/audio/speech", { method: "OPTIONS", auth: false, envOverrides: noKeys });
    expect(preflight.status).toBe(204);
  });

  it("serves anonymous callers only with ALLOW_ANONYMOUS=true, as one owner", async () => {
    const open = { envOverrides: { ...noKeys, ALLOW_ANONYMOUS: "true" } };
    const created = await (await createVoice("alice", "Open voice", undefined, open)).json();
    const stored = await env.VOICES.head(`clips/${created.id}`);
    expect(stored.customMetadata.owner).toBe("anonymous");
    // Whatever key an OpenAI client sends, and none at all: the same owner.
    const listed = await (await call("/v1/audio/voices", { auth: false, ...open })).json();
    expect(listed.voices.map((voice) => voice.id)).toContain(created.id);
    // With keys configured too, a wrong key is still refused.
    await expectError(
      await call("/v1/audio/voice_consents", {
        auth: false,
        headers: { authorization: "Bearer wrong" },
        envOverrides: { ALLOW_ANONYMOUS: "true" },
      }),
      401,
    );
    expect(
      (await call("/v1/audio/voice_consents", { auth: false, envOverrides: { ALLOW_ANONYMOUS: "true" } })).status,
    ).toBe(200);
  });

  it("refuses a malformed API_KEYS with the setting's name", async () => {
    for (const value of ["not json", '["a"]', '{"alice": "short"}', '{"anonymous": "' + "a".repeat(64) + '"}']) {
      await expectError(await call("/v1/models", { envOverrides: { API_KEYS: value } }), 500, {
        code: "bad_config",
        message: /API_KEYS/,
      });
    }
  });
});

describe("keys with owners", () => {
  it("keeps each owner's voices to itself: listing, use and deletion; other ids answer 404", async () => {
    const mine = await (await createVoice("alice", "Alice's")).json();
    const theirs = await (await createVoice("bob", "Bob's")).json();
    const listed = async (owner) =>
      (await (await call("/v1/audio/voices", as(owner))).json()).voices.map((voice) => voice.id);
    expect(await listed("alice")).toContain(mine.id);
    expect(await listed("alice")).not.toContain(theirs.id);
    expect(await listed("bob")).toEqual(expect.arrayContaining([theirs.id]));
    expect(await listed("bob")).not.toContain(mine.id);
    // Presets and voices.json stay shared.
    const presets = { envOverrides: { PRESET_VOICES: "en-Alice_woman" } };
    expect((await (await call("/v1/audio/voices", as("bob", presets))).json()).voices[0].id).toBe("en-Alice_woman");

    await expectError(await call(`/v1/audio/voices/${theirs.id}`, as("alice")), 404, { code: "voice_not_found" });
    await expectError(await speech({ input: uniqueText(), voice: { id: theirs.id } }, as("alice", WHOLE)), 404, {
      param: "voice",
    });
    await expectError(await call(`/v1/audio/voices/${theirs.id}`, as("alice", { method: "DELETE" })), 404);
    expect(await env.VOICES.head(`clips/${theirs.id}`)).not.toBeNull(); // untouched

    const text = uniqueText();
    expect((await speech({ input: text, voice: { id: theirs.id } }, as("bob", WHOLE))).status).toBe(200);
    expect((await jobs(text))[0].input.voice_url).toContain(theirs.id);
  });

  it("keeps each owner's consent recordings to itself, names included", async () => {
    const mine = await (await createConsent("alice")).json();
    const theirs = await (await createConsent("bob")).json();
    const page = await (await call("/v1/audio/voice_consents", as("alice"))).json();
    expect(page.data.map((consent) => consent.id)).toEqual([mine.id]);
    const path = `/v1/audio/voice_consents/${theirs.id}`;
    await expectError(await call(path, as("alice")), 404, { code: "consent_not_found" });
    await expectError(await call(path, as("alice", { method: "POST", body: { name: "Mine now" } })), 404);
    await expectError(await call(path, as("alice", { method: "DELETE" })), 404);
    await expectError(await createVoice("alice", "Borrowed", theirs.id), 404, { param: "consent" });
    expect(await (await call(path, as("bob"))).json()).toMatchObject({ id: theirs.id, name: "Consent" });
  });

  it("lets an admin (ADMIN_OWNERS) see, use and delete every owner's voices and consents", async () => {
    const voice = await (await createVoice("alice", "Alice's")).json();
    const consent = await (await createConsent("bob")).json();
    const voices = (await (await call("/v1/audio/voices", as("ops"))).json()).voices;
    expect(voices.find((entry) => entry.id === voice.id)).toMatchObject({ owner: "alice" });
    const consents = (await (await call("/v1/audio/voice_consents", as("ops"))).json()).data;
    expect(consents.find((entry) => entry.id === consent.id)).toMatchObject({ owner: "bob" });
    expect((await speech({ input: uniqueText(), voice: voice.id }, as("ops", WHOLE))).status).toBe(200);
    expect((await call(`/v1/audio/voices/${voice.id}`, as("ops", { method: "DELETE" }))).status).toBe(200);
    expect((await call(`/v1/audio/voice_consents/${consent.id}`, as("ops", { method: "DELETE" }))).status).toBe(200);
  });

  it("keeps AUTH_TOKEN working as the owner 'default', and takes two keys for one owner (rotation)", async () => {
    const voice = await (await call("/v1/audio/voices", { method: "POST", body: voiceForm("Default's") })).json();
    expect((await env.VOICES.head(`clips/${voice.id}`)).customMetadata.owner).toBe("default");
    await expectError(await call(`/v1/audio/voices/${voice.id}`, as("alice")), 404);

    const digest = async (key) =>
      Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key))), (b) =>
        b.toString(16).padStart(2, "0"),
      ).join("");
    const rotating = {
      envOverrides: { API_KEYS: JSON.stringify({ carol: [await digest("old"), await digest("new")] }) },
    };
    for (const key of ["old", "new"]) {
      const response = await call("/v1/audio/voice_consents", {
        auth: false,
        headers: { authorization: `Bearer ${key}` },
        ...rotating,
      });
      expect(response.status).toBe(200);
    }
  });
});

describe("clip URLs in their own trust domain", () => {
  const clipVoice = async () => {
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { narrator: { clip: "clips/narrator.wav" } } }));
    await env.VOICES.put("clips/narrator.wav", tinyWav(500));
  };

  it("need CLIP_URL_SECRET, not a key derived from RunPod's, and say so at the first cloned voice", async () => {
    await clipVoice();
    const text = uniqueText();
    const response = await speech({ input: text, voice: "narrator" }, { envOverrides: { CLIP_URL_SECRET: undefined } });
    await expectError(response, 503, { code: "not_configured", message: /CLIP_URL_SECRET/ });
    expect(await jobs(text)).toEqual([]);
    // Presets need neither.
    const preset = await speech(
      { input: uniqueText(), voice: "alloy" },
      { envOverrides: { CLIP_URL_SECRET: undefined } },
    );
    expect(preset.status).toBe(200);
  });

  it("need PUBLIC_URL: the Host header never decides where the worker fetches from", async () => {
    await clipVoice();
    const text = uniqueText();
    const response = await speech({ input: text, voice: "narrator" }, { envOverrides: { PUBLIC_URL: undefined } });
    await expectError(response, 503, { code: "not_configured", message: /PUBLIC_URL/ });
    expect(await jobs(text)).toEqual([]);
  });

  it("serve clip objects only, never voices.json or consent recordings, even when signed", async () => {
    await clipVoice();
    const consent = await (await createConsent("alice")).json();
    for (const key of ["voices.json", `consents/${consent.id}`, "clips/narrator.wav"]) {
      const expires = Math.floor(Date.now() / 1000) + 60;
      const hmac = await crypto.subtle.importKey(
        "raw",
        new TextEncoder().encode(env.CLIP_URL_SECRET),
        { name: "HMAC", hash: "SHA-256" },
        false,
        ["sign"],
      );
      const mac = await crypto.subtle.sign("HMAC", hmac, new TextEncoder().encode(`${key}\n${expires}`));
      const signature = Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
      const response = await call(`/voice-clips/${encodeURIComponent(key)}?expires=${expires}&signature=${signature}`, {
        auth: false,
      });
      if (key.startsWith("clips/")) expect(response.status).toBe(200);
      else await expectError(response, 403, { code: "invalid_signature" });
    }
  });

  it("refuses a voices.json clip outside clips/", async () => {
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { sneaky: { clip: "consents/cons_x" } } }));
    await expectError(await call("/v1/audio/voices"), 500, { code: "bad_voices_config", message: /outside clips\// });
  });
});

describe("consent that means something", () => {
  it("is single-use and bound to the voice created with it", async () => {
    const consent = await (await createConsent("alice")).json();
    const voice = await (await createVoice("alice", "First", consent.id)).json();
    const bound = await (await call(`/v1/audio/voice_consents/${consent.id}`, as("alice"))).json();
    expect(bound.voice_id).toBe(voice.id);
    expect((await env.VOICES.head(`clips/${voice.id}`)).customMetadata.consent).toBe(consent.id);
    await expectError(await createVoice("alice", "Second", consent.id), 409, {
      param: "consent",
      code: "consent_used",
    });
  });

  it("binds once when two voices are created with it at the same moment", async () => {
    const consent = await (await createConsent("alice")).json();
    const answers = await Promise.all([0, 1, 2].map((n) => createVoice("alice", `Race ${n}`, consent.id)));
    expect(answers.map((answer) => answer.status).sort()).toEqual([200, 409, 409]);
    const page = await (await call("/v1/audio/voices", as("alice"))).json();
    expect(page.voices.filter((entry) => entry.type === "audio_sample" && entry.id.startsWith("voice_"))).toHaveLength(
      1,
    );
  });

  it("cannot be deleted while its voice exists, unless both go", async () => {
    const consent = await (await createConsent("alice")).json();
    const voice = await (await createVoice("alice", "Kept", consent.id)).json();
    const path = `/v1/audio/voice_consents/${consent.id}`;
    await expectError(await call(path, as("alice", { method: "DELETE" })), 409, { code: "consent_in_use" });
    const both = await call(`${path}?delete_voice=true`, as("alice", { method: "DELETE" }));
    expect(await both.json()).toEqual({
      id: consent.id,
      object: "audio.voice_consent",
      deleted: true,
      deleted_voice: voice.id,
    });
    expect(await env.VOICES.head(`clips/${voice.id}`)).toBeNull();
  });

  it("refuses a voice whose consent recording is gone", async () => {
    const consent = await (await createConsent("alice")).json();
    const voice = await (await createVoice("alice", "Orphan", consent.id)).json();
    await env.VOICES.delete(`consents/${consent.id}`); // removed behind the bridge's back
    const text = uniqueText();
    await expectError(await speech({ input: text, voice: { id: voice.id } }, as("alice", WHOLE)), 400, {
      param: "voice",
      code: "consent_missing",
    });
    expect(await jobs(text)).toEqual([]);
  });
});

describe("quotas and bounded listings", () => {
  it("limits each owner's voices and consents (MAX_VOICES_PER_OWNER, MAX_CONSENTS_PER_OWNER)", async () => {
    const limits = { envOverrides: { MAX_VOICES_PER_OWNER: "2", MAX_CONSENTS_PER_OWNER: "1" } };
    for (let n = 0; n < 2; n++) expect((await createVoice("alice", `v${n}`, undefined, limits)).status).toBe(200);
    await expectError(await createVoice("alice", "one too many", undefined, limits), 429, {
      code: "quota_exceeded",
      message: /MAX_VOICES_PER_OWNER/,
    });
    expect((await createVoice("bob", "Bob's first", undefined, limits)).status).toBe(200); // per owner
    expect((await createConsent("alice", limits)).status).toBe(200);
    await expectError(await createConsent("alice", limits), 429, { message: /MAX_CONSENTS_PER_OWNER/ });
  });

  it("pages with limit and after, one R2 list call per page", async () => {
    const ids = [];
    for (let n = 0; n < 5; n++) ids.push((await (await createVoice("alice", `v${n}`)).json()).id);
    for (let n = 0; n < 3; n++) await createVoice("bob", `b${n}`);
    const lists = [];
    const counting = new Proxy(env.VOICES, {
      get(target, name) {
        if (name === "list") return (options) => (lists.push(options), target.list(options));
        const value = target[name];
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    const seen = [];
    let after = "";
    for (let page = 0; page < 5; page++) {
      lists.length = 0;
      const query = `?limit=2${after ? `&after=${after}` : ""}`;
      const body = await (
        await call(`/v1/audio/voices${query}`, as("alice", { envOverrides: { VOICES: counting } }))
      ).json();
      expect(lists).toHaveLength(1);
      seen.push(...body.voices.filter((voice) => voice.id.startsWith("voice_")).map((voice) => voice.id));
      if (!body.has_more) break;
      after = body.last_id;
    }
    expect(seen.sort()).toEqual([...ids].sort());
    await expectError(await call("/v1/audio/voices?limit=1000", as("alice")), 400, { param: "limit" });
    await expectError(await call("/v1/audio/voices?after=../x", as("alice")), 400, { param: "after" });
  });
});

describe("results from the worker's storage", () => {
  it("retries a download that fails in passing", async () => {
    const text = uniqueText();
    await plan(text, { delivery: "url", flaky: { audio: 2 } });
    const response = await speech({ input: text }, WHOLE);
    expect(response.status).toBe(200);
    expect(textOf(await response.arrayBuffer())).toBe(`AUDIO:mp3:${text}`);
    expect((await jobs(text))[0].downloads).toBe(3);
  });

  it("refuses a file over MAX_AUDIO_BYTES before sending anything", async () => {
    const text = uniqueText();
    await plan(text, { delivery: "url", audioSize: 1_500_000 });
    const response = await speech(
      { input: text },
      { envOverrides: { STREAM_AUDIO: "false", MAX_AUDIO_BYTES: "1000000" } },
    );
    await expectError(response, 502, { message: /over the bridge's 1 MB limit \(MAX_AUDIO_BYTES\)/ });
  });

  it("streams a file through, with its length: the reply begins before the file has arrived", async () => {
    for (const extra of [{}, { timestamps: true }]) {
      const text = uniqueText();
      await plan(text, { delivery: "url", audioSize: 200_000, audioHold: true });
      const response = await speech({ input: text, ...extra }, WHOLE);
      expect(response.status).toBe(200);
      const reader = response.body.getReader();
      const first = await reader.read(); // the storage has sent half the file so far
      expect(first.done).toBe(false);
      await release(text);
      let size = first.value.byteLength;
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) size += chunk.value.byteLength;
      if (extra.timestamps) expect(size).toBeGreaterThan(Math.ceil(200_000 / 3) * 4);
      else expect([size, response.headers.get("content-length")]).toEqual([200_000, "200000"]);
    }
  });

  it("breaks the transfer when the file ends short of its length", async () => {
    const text = uniqueText();
    await plan(text, { delivery: "url", audioSize: 100_000, audioShort: 1000 });
    const response = await speech({ input: text }, WHOLE);
    await expect(response.arrayBuffer()).rejects.toThrow();
  });
});

describe("headers", () => {
  it("mark every API and clip answer nosniff, private and varying by Authorization", async () => {
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { narrator: { clip: "clips/narrator.wav" } } }));
    await env.VOICES.put("clips/narrator.wav", tinyWav(500));
    const text = uniqueText();
    const answers = [
      await call("/v1/models"),
      await call("/v1/audio/voices", { auth: false }),
      await call("/v1/audio/voices"),
      await call("/v1/audio/voice_consents", { auth: false }), // 401
      await speech({ input: text, voice: "narrator" }, WHOLE),
      await call("/health", { auth: false }),
    ];
    const clip = new URL((await jobs(text))[0].input.voice_url);
    answers.push(await call(clip.pathname + clip.search, { auth: false }));
    for (const answer of answers) {
      expect(answer.headers.get("x-content-type-options")).toBe("nosniff");
      expect(answer.headers.get("cache-control")).toBe("private, no-store");
      expect(answer.headers.get("vary")).toContain("Authorization");
      await answer.arrayBuffer();
    }
  });
});

describe("replies never carry the worker's internals", () => {
  it("keeps storage hosts, buckets, keys and tracebacks out of every mode's reply", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const internals = "S3 upload failed: NoSuchBucket (http://10.9.8.7:9000/private-bucket/vibevoice/2026/x.mp3)";
    const traceback = JSON.stringify({
      error_type: "<class 'botocore.exceptions.EndpointConnectionError'>",
      error_message: 'Could not connect to the endpoint URL: "http://10.9.8.7:9000/private-bucket"',
      error_traceback: 'Traceback (most recent call last):\n  File "/app/jobs/storage.py", line 70',
    });
    const seen = [];
    for (const fail of [internals, traceback, `streaming stopped after 1 item(s): ${internals}`]) {
      for (const body of [{}, { stream_format: "sse" }, { stream_format: "audio" }, { timestamps: true }]) {
        const text = uniqueText();
        await plan(text, { fail, chunks: ["a"] });
        const response = await speech({ input: text, ...body }, WHOLE);
        seen.push(JSON.stringify([...response.headers]), await response.text().catch(() => ""));
      }
    }
    const everything = seen.join("\n");
    for (const secret of [
      "10.9.8.7",
      "private-bucket",
      "vibevoice/2026",
      "Traceback",
      "storage.py",
      TOKEN,
      KEYS.alice,
    ]) {
      expect(everything).not.toContain(secret);
    }
  });
});
