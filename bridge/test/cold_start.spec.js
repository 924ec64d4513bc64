// A job queued behind a cold start: the bridge keeps waiting within JOB_TIMEOUT_SECONDS, an SSE reply
// keeps its connection alive with comments, and the job's RunPod TTL follows the deadline.
import { reset } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it } from "vitest";
import { loadConfig } from "../src/config.js";
import {
  disconnectable,
  expectError,
  jobs,
  parseSse,
  plan,
  speech,
  textOf,
  uniqueText,
  waitForJob,
} from "./helpers.js";

afterEach(() => reset());

// Keep-alive after 100 ms of silence; the stand-in keeps each job IN_QUEUE for 600 ms.
const QUICK = { SSE_KEEPALIVE_SECONDS: "0.1" };
const COLD_MS = 600;

describe("a job queued behind a cold start", () => {
  it("an SSE reply starts with keep-alive comments, then sends the audio", async () => {
    for (const format of ["mp3", "flac"]) {
      // mp3 streams (/run + /stream); flac is a whole file (/runsync + /status), sent as one delta
      const text = uniqueText(format);
      await plan(text, { queued: COLD_MS, chunks: ["abc", "def"] });
      const response = await speech(
        { input: text, response_format: format, stream_format: "sse" },
        { envOverrides: QUICK },
      );
      expect(response.status).toBe(200);
      const body = await response.text();
      expect(body.startsWith(": keep-alive\n\n")).toBe(true);
      const events = parseSse(body);
      expect(events.at(-1).type).toBe("speech.audio.done");
      const audio = events.filter((event) => event.type === "speech.audio.delta").map((event) => atob(event.audio));
      expect(audio.join("")).toBe(format === "mp3" ? "abcdef" : `AUDIO:flac:${text}`);
      const [job] = await jobs(text);
      expect(job.cancelled).toBe(false);
    }
  });

  it("a failure before any audio keeps its status while the wait is short, and is an error event after", async () => {
    const sentence = "'speaker': unknown voice 'Bob'; available voices: en-Alice_woman.";
    let text = uniqueText();
    await plan(text, { fail: sentence });
    await expectError(await speech({ input: text, stream_format: "sse" }, { envOverrides: QUICK }), 400, {
      param: "voice",
    });

    text = uniqueText();
    await plan(text, { queued: COLD_MS, fail: sentence });
    const response = await speech({ input: text, stream_format: "sse" }, { envOverrides: QUICK });
    expect(response.status).toBe(200); // the reply had started with keep-alive comments
    const events = parseSse(await response.text());
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ type: "error", error: { param: "voice", message: sentence } });
  });

  it("a raw stream and a whole file wait without sending anything, then answer in full", async () => {
    for (const [format, expected] of [
      ["pcm", "abcdef"],
      ["wav", null],
    ]) {
      const text = uniqueText(format);
      await plan(text, { queued: COLD_MS, chunks: ["abc", "def"] });
      const stream_format = format === "pcm" ? "audio" : undefined;
      const envOverrides = format === "wav" ? { ...QUICK, STREAM_AUDIO: "false" } : QUICK;
      const response = await speech({ input: text, response_format: format, stream_format }, { envOverrides });
      expect(response.status).toBe(200);
      const body = new TextDecoder().decode(await response.arrayBuffer());
      expect(body).toBe(expected ?? `AUDIO:wav:${text}`);
      const [job] = await jobs(text);
      expect(job.calls.filter((call) => call === "status" || call === "stream").length).toBeGreaterThan(1);
    }
  });

  it("a client that leaves while keep-alive comments flow cancels the queued job", async () => {
    const text = uniqueText();
    await plan(text, { queued: 60_000 });
    const client = disconnectable({ input: text, stream_format: "sse" }, { envOverrides: QUICK });
    const response = await client.response;
    const reader = response.body.getReader();
    expect(textOf((await reader.read()).value)).toBe(": keep-alive\n\n");
    client.abort();
    await client.settled();
    const job = await waitForJob(text, (candidate) => candidate.cancelled);
    expect(job.cancels).toBeGreaterThanOrEqual(1);
  });

  it("past the deadline the job is cancelled and the client gets 504", async () => {
    const text = uniqueText();
    await plan(text, { queued: 60_000 });
    const response = await speech(
      { input: text, response_format: "flac" },
      { envOverrides: { JOB_TIMEOUT_SECONDS: "1", RUNSYNC_WAIT_SECONDS: "1" } },
    );
    await expectError(response, 504, { code: "upstream_timeout" });
    await response.settled();
    const [job] = await jobs(text);
    expect(job.cancelled).toBe(true);
    expect(job.policy.ttl).toBe((1 + 30) * 1000);
  });

  it("the default deadline covers a cold start of ten minutes, and the TTL follows it", async () => {
    const config = loadConfig({});
    expect(config.JOB_TIMEOUT_SECONDS).toBeGreaterThanOrEqual(600 + 240); // cold start + a long job
    expect(loadConfig(env).JOB_TIMEOUT_SECONDS).toBe(config.JOB_TIMEOUT_SECONDS); // wrangler.jsonc agrees
    const text = uniqueText();
    await speech({ input: text, response_format: "flac" }).then((response) => response.arrayBuffer());
    const [job] = await jobs(text);
    expect(job.policy.ttl).toBe((config.JOB_TIMEOUT_SECONDS + config.TTL_MARGIN_SECONDS) * 1000);
    expect(job.policy.executionTimeout).toBeLessThanOrEqual(config.JOB_TIMEOUT_SECONDS * 1000);
  });
});
