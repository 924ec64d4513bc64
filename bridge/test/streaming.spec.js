// Streaming: stream_format "audio" (raw bytes as RunPod stream items arrive) and "sse".
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it } from "vitest";
import { expectError, jobs, parseSse, plan, release, speech, textOf, uniqueText } from "./helpers.js";

afterEach(() => reset());

async function readAll(reader) {
  const parts = [];
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return parts;
    parts.push(textOf(value));
  }
}

describe("stream_format audio", () => {
  it("sends bytes to the client before the job has finished", async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["first ", "second ", "third"], hold: 1 });
    const response = await speech({ input: text, response_format: "pcm", stream_format: "audio" });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toBe("audio/pcm");
    const reader = response.body.getReader();
    const first = await reader.read();
    expect(textOf(first.value)).toBe("first ");

    // The job is still running: the stand-in holds the rest until released.
    const [running] = await jobs(text);
    expect(running.sent).toBe(1);
    expect(running.calls).toContain("stream");

    await release(text);
    expect((await readAll(reader)).join("")).toBe("second third");
    const [job] = await jobs(text);
    expect(job.op).toBe("run");
    expect(job.input).toMatchObject({ stream: true, output_format: "pcm_16", sample_rate: 24000, return: "auto" });
    expect(response.headers.get("x-runpod-job-id")).toBe(job.id);
  });

  it("sends stream_chunk_ms on streamed jobs only", async () => {
    let text = uniqueText();
    await speech({ input: text, stream_format: "audio", stream_chunk_ms: 250 }).then((r) => r.arrayBuffer());
    expect((await jobs(text))[0].input.stream_chunk_ms).toBe(250);
    text = uniqueText();
    await speech({ input: text, response_format: "flac", stream_chunk_ms: 250 }).then((r) => r.arrayBuffer());
    expect((await jobs(text))[0].input).not.toHaveProperty("stream_chunk_ms");
  });

  it("streams by default (no stream_format) for formats the worker streams", async () => {
    for (const format of ["mp3", "opus", "wav", "pcm"]) {
      const text = uniqueText(format);
      await plan(text, { chunks: ["a", "b", "c"] });
      const response = await speech({ input: text, response_format: format });
      expect(textOf(await response.arrayBuffer())).toBe("abc");
      const [job] = await jobs(text);
      expect(job.op).toBe("run");
    }
  });

  it("sends aac and flac as whole files from /runsync", async () => {
    for (const format of ["aac", "flac"]) {
      const text = uniqueText(format);
      const response = await speech({ input: text, response_format: format, stream_format: "audio" });
      expect(response.headers.get("content-type")).toBe(`audio/${format}`);
      expect(textOf(await response.arrayBuffer())).toBe(`AUDIO:${format}:${text}`);
      const [job] = await jobs(text);
      expect(job.op).toBe("runsync");
    }
  });

  it("drops repeated stream items and accepts a whole result in the stream", async () => {
    let text = uniqueText();
    await plan(text, { chunks: ["x", "y"], repeat: true });
    expect(textOf(await (await speech({ input: text, stream_format: "audio" })).arrayBuffer())).toBe("xy");

    text = uniqueText();
    await plan(text, { wholeInStream: true, audio: "whole file" });
    expect(textOf(await (await speech({ input: text, stream_format: "audio" })).arrayBuffer())).toBe("whole file");
  });

  it("answers a failure before the first byte with its proper status", async () => {
    let text = uniqueText();
    await plan(text, { fail: "'speaker': unknown voice 'nobody'; available voices: Alice." });
    await expectError(await speech({ input: text, stream_format: "audio" }), 400, { param: "voice" });

    text = uniqueText();
    await plan(text, {
      chunks: [],
      fail: "internal error while generating audio (RuntimeError); the job was not completed.",
      streamError: true,
    });
    const error = await expectError(await speech({ input: text, stream_format: "audio" }), 502);
    expect(error.message).toMatch(/failed while generating the audio/); // read from /status: the /stream reply had none
    const [job] = await jobs(text);
    expect(job.calls).toContain("status");

    text = uniqueText();
    await plan(text, { http: { run: 500 } });
    await expectError(await speech({ input: text, stream_format: "audio" }), 502);
  });

  it("breaks the transfer when the job fails after audio was sent", async () => {
    const text = uniqueText();
    await plan(text, {
      chunks: ["good "],
      fail: "internal error while generating audio (RuntimeError); the job was not completed.",
    });
    const response = await speech({ input: text, stream_format: "audio" });
    expect(response.status).toBe(200);
    await expect(response.arrayBuffer()).rejects.toThrow();
  });

  it("cancels the job when a write to the client fails", async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["one", "two", "three"], hold: 2 });
    const response = await speech({ input: text, stream_format: "audio" });
    const reader = response.body.getReader();
    await reader.read();
    await reader.cancel(); // the next write fails; the job still holds its last piece
    await response.settled();
    const [job] = await jobs(text);
    expect(job.cancelled).toBe(true);
    expect(job.sent).toBe(2);
  });

  it("gives up at the job deadline with 504 and cancels the job", async () => {
    const text = uniqueText();
    await plan(text, { never: true });
    const response = await speech(
      { input: text, stream_format: "audio" },
      { envOverrides: { JOB_TIMEOUT_SECONDS: "1" } },
    );
    await expectError(response, 504, { code: "upstream_timeout" });
    await response.settled();
    const [job] = await jobs(text);
    expect(job.cancelled).toBe(true);
  });
});

describe("stream_format sse", () => {
  it("sends speech.audio.delta events with base64 audio, then speech.audio.done with usage", async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["abc", "defg"] });
    const response = await speech({ input: text, response_format: "mp3", stream_format: "sse" });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toBe("text/event-stream");
    const events = parseSse(await response.text());
    expect(events.map((event) => event.type)).toEqual([
      "speech.audio.delta",
      "speech.audio.delta",
      "speech.audio.done",
    ]);
    expect(events.slice(0, 2).map((event) => atob(event.audio))).toEqual(["abc", "defg"]);
    // usage: input characters, and 7.5 speech frames per second of the 2.0 s the worker reported
    expect(events[2].usage).toEqual({ input_tokens: text.length, output_tokens: 15, total_tokens: text.length + 15 });
  });

  it("sends a whole flac file as one delta", async () => {
    const text = uniqueText();
    const response = await speech({ input: text, response_format: "flac", stream_format: "sse" });
    const events = parseSse(await response.text());
    expect(events).toHaveLength(2);
    expect(atob(events[0].audio)).toBe(`AUDIO:flac:${text}`);
    expect(events[1].usage.output_tokens).toBe(9); // 1.2 s
  });

  it("ends with an error event when the job fails after audio was sent", async () => {
    const text = uniqueText();
    await plan(text, {
      chunks: ["abc"],
      fail: "internal error while generating audio (RuntimeError); the job was not completed.",
    });
    const events = parseSse(await (await speech({ input: text, stream_format: "sse" })).text());
    expect(events[0].type).toBe("speech.audio.delta");
    expect(events.at(-1).type).toBe("error");
    expect(events.at(-1).error).toMatchObject({ type: "server_error", code: "worker_error" });
  });
});
