// OpenAI's voice names out of the box: each speaks with a preset unless voices.json maps it.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it } from "vitest";
import { OPENAI_VOICES } from "../src/openai_voices.js";
import { call, expectError, jobs, speech, uniqueText } from "./helpers.js";

afterEach(() => reset());

// A fresh deployment: no voices.json, the map on, wrangler.jsonc's presets (the fetched reference voices,
// which tests/test_deploy_files.py keeps equal to demo/voices.json).
const PRESETS = [
  "en-Alice_woman",
  "en-Carter_man",
  "en-Frank_man",
  "en-Mary_woman_bgm",
  "en-Maya_woman",
  "in-Samuel_man",
  "zh-Anchen_man_bgm",
  "zh-Bowen_man",
  "zh-Xinran_woman",
];
const FRESH = { OPENAI_VOICES: "true", PRESET_VOICES: PRESETS.join(",") };
const WHOLE = { STREAM_AUDIO: "false" };
const OPENAI_NAMES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"];

async function listed(envOverrides) {
  return (await (await call("/v1/audio/voices", { envOverrides })).json()).voices;
}

describe("OpenAI's voice names", () => {
  it("cover every name of OpenAI's speech guide, each mapped to a preset", () => {
    for (const name of OPENAI_NAMES) expect(OPENAI_VOICES[name]).toMatch(/^[a-z]{2}-[A-Za-z]+_(man|woman)$/);
  });

  it("are listed with both names and speak with their preset, with no voices.json", async () => {
    const voices = await listed(FRESH);
    const alloy = voices.find((voice) => voice.id === "alloy");
    expect(alloy).toMatchObject({ name: "Alloy (Alice)", type: "preset" });
    expect(voices.find((voice) => voice.id === "ash").name).toBe("Ash (Carter)");
    expect(voices.map((voice) => voice.id)).toEqual(expect.arrayContaining(OPENAI_NAMES));
    for (const name of ["alloy", "echo", "Onyx"]) {
      const text = uniqueText(name);
      const response = await speech({ input: text, voice: name }, { envOverrides: { ...FRESH, ...WHOLE } });
      expect(response.status).toBe(200);
      expect((await jobs(text))[0].input.speaker).toBe(OPENAI_VOICES[name.toLowerCase()]);
    }
  });

  it("give way to voices.json: an entry there wins, in any case, and keeps its place first", async () => {
    await env.VOICES.put("voices.json", JSON.stringify({ voices: { ALLOY: { preset: "Frank", name: "Mine" } } }));
    const voices = await listed({ ...FRESH, VOICES_CACHE_SECONDS: "0" });
    expect(voices[0]).toMatchObject({ id: "ALLOY", name: "Mine" });
    expect(voices.filter((voice) => voice.id.toLowerCase() === "alloy")).toHaveLength(1);
    const text = uniqueText();
    await (await speech({ input: text, voice: "alloy" }, { envOverrides: { ...FRESH, ...WHOLE } })).arrayBuffer();
    expect((await jobs(text))[0].input.speaker).toBe("Frank");
  });

  it("follow PRESET_VOICES: a name whose preset the endpoint lacks is not offered", async () => {
    const presets = { ...FRESH, PRESET_VOICES: "en-Alice_woman,en-Frank_man" };
    const ids = (await listed(presets)).map((voice) => voice.id);
    expect(ids).toEqual(expect.arrayContaining(["alloy", "echo", "onyx"]));
    expect(ids).not.toContain("ash"); // Carter is not among the presets
    await expectError(await speech({ input: "x", voice: "ash" }, { envOverrides: presets }), 400, {
      param: "voice",
      message: /unknown voice 'ash'/,
    });
  });

  it("are off with OPENAI_VOICES=false, and cannot be deleted", async () => {
    expect((await listed({ ...FRESH, OPENAI_VOICES: "false" })).map((voice) => voice.id)).not.toContain("alloy");
    const response = await call("/v1/audio/voices/alloy", { method: "DELETE", envOverrides: FRESH });
    await expectError(response, 400, { code: "voice_not_deletable", message: /OpenAI's voice names/ });
  });

  it("are in the anonymous listing Open WebUI reads", async () => {
    const response = await call("/v1/audio/voices", { auth: false, envOverrides: FRESH });
    expect(response.status).toBe(200);
    expect((await response.json()).voices.map((voice) => voice.id)).toContain("alloy");
  });
});
