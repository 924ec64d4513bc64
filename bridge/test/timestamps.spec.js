// The "timestamps": true extra and pause tags, against the RunPod stand-in.
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it } from "vitest";
import { expectError, jobs, plan, speech, textOf, uniqueText } from "./helpers.js";

afterEach(() => reset());

const WORDS = [
  { word: "Hello,", start_sec: 0.12, end_sec: 0.48, speaker: "Speaker 1" },
  { word: "world.", start_sec: 1.31, end_sec: 1.8, speaker: "Speaker 1" },
];

function workerResult(text, extra = {}) {
  const audio = Buffer.from(`AUDIO:${text}`).toString("base64");
  return { status: "completed", format: "mp3", duration_sec: 2.1, audio_base64: audio, words: WORDS, ...extra };
}

describe('"timestamps": true', () => {
  it("asks the worker for word timestamps and answers JSON with base64 audio and the words", async () => {
    const text = `${uniqueText()} [pause:750ms] more`;
    await plan(text, { output: [workerResult(text)] });
    const response = await speech({ input: text, timestamps: true });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toBe("application/json");
    const body = await response.json();
    expect(textOf(Buffer.from(body.audio, "base64"))).toBe(`AUDIO:${text}`);
    expect(body).toMatchObject({ audio_format: "mp3", content_type: "audio/mpeg", duration_sec: 2.1 });
    expect(body.timestamps).toEqual([
      { word: "Hello,", start_time: 0.12, end_time: 0.48, speaker: "Speaker 1" },
      { word: "world.", start_time: 1.31, end_time: 1.8, speaker: "Speaker 1" },
    ]);
    const [job] = await jobs(text);
    expect(job.op).toBe("runsync"); // one whole file, although streaming is the default
    expect(job.input).toMatchObject({ text, timestamps: "word", output_format: "mp3" });
    expect(response.headers.get("x-runpod-job-id")).toBe(job.id);
  });

  it("keeps the plain OpenAI reply without the field or with false", async () => {
    for (const extra of [{}, { timestamps: false }]) {
      const text = uniqueText();
      const response = await speech({ input: text, ...extra }, { envOverrides: { STREAM_AUDIO: "false" } });
      expect(response.headers.get("content-type")).toBe("audio/mpeg");
      expect(textOf(await response.arrayBuffer())).toBe(`AUDIO:mp3:${text}`);
      const [job] = await jobs(text);
      expect(job.input).not.toHaveProperty("timestamps");
    }
  });

  it("refuses a value that is not a boolean, and server-sent events", async () => {
    for (const [fields, param] of [
      [{ timestamps: "word" }, "timestamps"],
      [{ timestamps: 1 }, "timestamps"],
      [{ timestamps: true, stream_format: "sse" }, "stream_format"],
    ]) {
      const text = uniqueText();
      await expectError(await speech({ input: text, ...fields }), 400, { param });
      expect(await jobs(text)).toEqual([]);
    }
  });
});

describe("pause tags", () => {
  it("reach the worker as written, streamed or not", async () => {
    for (const options of [{}, { envOverrides: { STREAM_AUDIO: "false" } }]) {
      const text = `${uniqueText()} [pause] then [pause:2s] and [laughs]`;
      const response = await speech({ input: text }, options);
      expect(response.status).toBe(200);
      await response.arrayBuffer();
      const [job] = await jobs(text);
      expect(job.input.text).toBe(text);
    }
  });

  it("passes the worker's sentence about a malformed tag on as a 400 naming 'input'", async () => {
    const text = `${uniqueText()} [pause:soon]`;
    const sentence = "'text': has a malformed pause tag '[pause:soon]'; write [pause], [pause:750ms] or [pause:2s].";
    await plan(text, { fail: sentence });
    const error = await expectError(await speech({ input: text }, { envOverrides: { STREAM_AUDIO: "false" } }), 400, {
      param: "input",
    });
    expect(error.message).toBe(sentence);
  });
});
