// `speakers`: one voice per speaker of a multi-speaker script, resolved like `voice`.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { call, expectError, jobs, speech, tinyWav, uniqueText } from "./helpers.js";

const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };
const SCRIPT = "Speaker 1: Hello.\nSpeaker 2: Hi there.";

beforeEach(async () => {
  await env.VOICES.put(
    "voices.json",
    JSON.stringify({
      voices: {
        alloy: "Alice",
        echo: { preset: "Frank", name: "Echo (Frank)" },
        narrator: { clip: "clips/narrator.wav" },
        remote: { url: "https://voices.example/remote.wav" },
      },
    }),
  );
  await env.VOICES.put("clips/narrator.wav", tinyWav(1200));
});
afterEach(() => reset());

async function createdVoice(bytes = tinyWav(2400)) {
  const form = new FormData();
  form.append("name", "Guest");
  form.append("audio_sample", new File([bytes], "guest.wav", { type: "audio/wav" }));
  return (await call("/v1/audio/voices", { method: "POST", body: form })).json();
}

const script = (label) => `${uniqueText(label)}\n${SCRIPT}`;

describe("speakers in speech requests", () => {
  it("sends one worker voice per speaker, in order, each resolved like 'voice'", async () => {
    const guest = await createdVoice();
    const text = script("speakers");
    const response = await speech(
      { input: text, voice: undefined, speakers: ["alloy", { id: "echo" }, { id: guest.id }, "narrator"] },
      WHOLE,
    );
    expect(response.status).toBe(200);
    const [job] = await jobs(text);
    expect(job.input.speakers).toEqual([
      "Alice",
      "Frank",
      { audio_url: expect.any(String) },
      { audio_url: expect.any(String) },
    ]);
    // Clips go to the worker as signed URLs to this bridge, like a single created voice.
    expect(new URL(job.input.speakers[2].audio_url).pathname).toBe(`/voice-clips/clips%2F${guest.id}`);
    expect(new URL(job.input.speakers[3].audio_url).pathname).toBe("/voice-clips/clips%2Fnarrator.wav");
    expect(job.input).not.toHaveProperty("speaker");
    expect(job.input).not.toHaveProperty("voice_url");
  });

  it("passes a url voice as audio_url, and any other name to the worker as a preset", async () => {
    const text = script("url");
    expect((await speech({ input: text, speakers: ["remote", "Carter"] }, WHOLE)).status).toBe(200);
    const [job] = await jobs(text);
    expect(job.input.speakers).toEqual([{ audio_url: "https://voices.example/remote.wav" }, "Carter"]);
  });

  it("uses the speakers, not 'voice', when both are given (OpenAI's SDKs require 'voice')", async () => {
    const text = script("both");
    expect((await speech({ input: text, voice: "alloy", speakers: ["echo", "echo"] })).status).toBe(200);
    const [job] = await jobs(text);
    expect(job.input.speakers).toEqual(["Frank", "Frank"]);
    expect(job.input).not.toHaveProperty("speaker");
  });

  const refused = [
    [[], "speakers"],
    ["alloy", "speakers"],
    [["a", "b", "c", "d", "e"], "speakers"],
    [["alloy", 7], "speakers[1]"],
    [["alloy", { name: "x" }], "speakers[1]"],
    [[""], "speakers[0]"],
  ];
  for (const [speakers, param] of refused) {
    it(`refuses speakers ${JSON.stringify(speakers)} with 400 naming '${param}'`, async () => {
      const text = script("bad");
      const error = await expectError(await speech({ input: text, speakers }), 400, { param });
      expect(error.message).toContain(`'${param}'`);
      expect(await jobs(text)).toEqual([]);
    });
  }

  it("still needs a voice when there are no speakers", async () => {
    await expectError(await speech({ input: uniqueText(), voice: undefined }), 400, { param: "voice" });
  });

  it("answers 404 for an unknown voice id among the speakers", async () => {
    const text = script("unknown");
    const response = await speech({ input: text, speakers: ["alloy", { id: "voice_0123456789abcdef01234567" }] });
    await expectError(response, 404, { param: "voice" });
    expect(await jobs(text)).toEqual([]);
  });
});
