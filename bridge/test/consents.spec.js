// OpenAI's voice consent recordings (/v1/audio/voice_consents) and REQUIRE_VOICE_CONSENT.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it } from "vitest";
import { call, expectError, tinyWav } from "./helpers.js";

afterEach(() => reset());

function consentForm(name = "Ada's consent", language = "en-US", bytes = tinyWav()) {
  const form = new FormData();
  form.append("name", name);
  form.append("language", language);
  form.append("recording", new File([bytes], "consent.wav", { type: "audio/wav" }));
  return form;
}

function voiceForm(consent) {
  const form = new FormData();
  form.append("name", "Ada");
  if (consent !== undefined) form.append("consent", consent);
  form.append("audio_sample", new File([tinyWav()], "sample.wav", { type: "audio/wav" }));
  return form;
}

const post = (path, body, options = {}) => call(path, { method: "POST", body, ...options });

describe("/v1/audio/voice_consents", () => {
  it("stores a recording and lists, gets, renames and deletes it", async () => {
    const recording = tinyWav(500);
    const response = await post("/v1/audio/voice_consents", consentForm("Ada", "en-GB", recording));
    expect(response.status).toBe(200);
    const consent = await response.json();
    expect(consent).toEqual({
      id: expect.stringMatching(/^cons_[0-9a-f]{24}$/),
      object: "audio.voice_consent",
      name: "Ada",
      language: "en-GB",
      created_at: expect.any(Number),
    });
    const stored = await env.VOICES.get(`consents/${consent.id}`);
    expect(new Uint8Array(await stored.arrayBuffer())).toEqual(recording);

    expect(await (await call(`/v1/audio/voice_consents/${consent.id}`)).json()).toEqual(consent);
    const renamed = await post(`/v1/audio/voice_consents/${consent.id}`, { name: "Ada L." });
    expect(await renamed.json()).toEqual({ ...consent, name: "Ada L." });
    const kept = await env.VOICES.get(`consents/${consent.id}`);
    expect(new Uint8Array(await kept.arrayBuffer())).toEqual(recording); // the recording is unchanged

    const list = await (await call("/v1/audio/voice_consents")).json();
    expect(list).toEqual({
      object: "list",
      data: [{ ...consent, name: "Ada L." }],
      first_id: consent.id,
      last_id: consent.id,
      has_more: false,
    });
    const deleted = await call(`/v1/audio/voice_consents/${consent.id}`, { method: "DELETE" });
    expect(await deleted.json()).toEqual({ id: consent.id, object: "audio.voice_consent", deleted: true });
    await expectError(await call(`/v1/audio/voice_consents/${consent.id}`), 404, { code: "consent_not_found" });
  });

  it("pages with limit and after, as the SDKs' cursor pages do", async () => {
    const ids = [];
    for (let i = 0; i < 5; i++)
      ids.push((await (await post("/v1/audio/voice_consents", consentForm(`c${i}`))).json()).id);
    const first = await (await call("/v1/audio/voice_consents?limit=2")).json();
    expect(first.has_more).toBe(true);
    const seen = [...first.data.map((consent) => consent.id)];
    let page = first;
    for (let i = 0; i < 5 && page.has_more; i++) {
      page = await (await call(`/v1/audio/voice_consents?limit=2&after=${page.last_id}`)).json();
      seen.push(...page.data.map((consent) => consent.id));
    }
    expect(seen.sort()).toEqual([...ids].sort());
  });

  it("refuses recordings that are missing, not audio or too large", async () => {
    const form = new FormData();
    form.append("name", "x");
    form.append("language", "en");
    await expectError(await post("/v1/audio/voice_consents", form), 400, { param: "recording" });
    const text = consentForm("x", "en", new TextEncoder().encode("not audio at all"));
    await expectError(await post("/v1/audio/voice_consents", text), 400, { param: "recording" });
    const capped = { envOverrides: { MAX_VOICE_BYTES: "2000" } };
    await expectError(await post("/v1/audio/voice_consents", consentForm("x", "en", tinyWav(1500)), capped), 413, {
      param: "recording",
    });
    await expectError(await post("/v1/audio/voice_consents", consentForm("", "en")), 400, { param: "name" });
  });
});

describe("REQUIRE_VOICE_CONSENT", () => {
  const required = { envOverrides: { REQUIRE_VOICE_CONSENT: "true" } };

  it("asks voice creation for the id of a stored consent recording", async () => {
    await expectError(await post("/v1/audio/voices", voiceForm(), required), 400, { param: "consent" });
    await expectError(await post("/v1/audio/voices", voiceForm("cons_000000000000000000000000"), required), 404, {
      param: "consent",
      code: "consent_not_found",
    });
    const consent = await (await post("/v1/audio/voice_consents", consentForm())).json();
    const voice = await post("/v1/audio/voices", voiceForm(consent.id), required);
    expect(voice.status).toBe(200);
    const stored = await env.VOICES.head(`clips/${(await voice.json()).id}`);
    expect(stored.customMetadata.consent).toBe(consent.id);
  });

  it("is off by default: a voice may come without a consent, but a given consent must be a stored one", async () => {
    expect((await post("/v1/audio/voices", voiceForm())).status).toBe(200);
    await expectError(await post("/v1/audio/voices", voiceForm("cons_anything")), 404, {
      param: "consent",
      code: "consent_not_found",
    });
  });
});
