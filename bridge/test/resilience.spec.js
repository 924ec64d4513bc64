// RunPod as documented: passing failures and rate limits on reads are retried, a refused
// submission is the client's 429, every job state is understood, split stream backlogs arrive
// whole, lost audio is never a shorter 200, and no error invites the SDKs to start a second job.
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { loadConfig } from "../src/config.js";
import { retryAfterMs, retryDelay } from "../src/runpod.js";
import { expectError, jobs, parseSse, plan, refused, speech, textOf, uniqueText } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };
const MODES = [
  ["whole file", {}, WHOLE],
  ["audio stream", { stream_format: "audio" }, {}],
];

describe("reads survive passing failures", () => {
  for (const [name, body, options] of MODES) {
    it(`${name}: 503s and 429s on /status and /stream are retried`, async () => {
      const text = uniqueText();
      await plan(text, {
        polls: 2,
        chunks: ["a", "b"],
        flaky: { status: 2, stream: 2 },
        limited: { status: 1, stream: 1 },
      });
      const response = await speech({ input: text, ...body }, options);
      expect(response.status).toBe(200);
      expect(textOf(await response.arrayBuffer())).toMatch(/^(ab|AUDIO:mp3:.*)$/);
      await response.settled();
      const [job] = await jobs(text);
      expect(job.cancels).toBe(0);
      const reads = job.calls.filter((call) => call === "status" || call === "stream").length;
      expect(reads).toBeGreaterThanOrEqual(4); // three refused, then the answers
    });
  }

  it("waits with exponential backoff and jitter, at least what Retry-After asks", () => {
    const config = loadConfig({ RETRY_BASE_MS: "100", RETRY_MAX_MS: "1000" });
    for (let i = 0; i < 50; i++) {
      for (const [attempt, ceiling] of [
        [1, 100],
        [2, 200],
        [3, 400],
        [5, 1000],
        [9, 1000],
      ]) {
        const delay = retryDelay(config, attempt, {});
        expect(delay).toBeGreaterThanOrEqual(ceiling / 2);
        expect(delay).toBeLessThanOrEqual(ceiling);
      }
      expect(retryDelay(config, 1, { retryAfterMs: 3000 })).toBe(3000);
    }
    expect(retryAfterMs("2")).toBe(2000);
    expect(retryAfterMs(new Date(Date.now() + 5000).toUTCString())).toBeGreaterThan(3000);
    expect(retryAfterMs("soon")).toBe(0);
    expect(retryAfterMs(null)).toBe(0);
  });
});

describe("RunPod's rate limit on a submission", () => {
  for (const [name, body, options] of MODES) {
    it(`${name}: is the client's 429 with Retry-After, which the SDKs may retry: no job was started`, async () => {
      const text = uniqueText();
      await plan(text, { limited: { run: 1, runsync: 1 }, retryAfter: "7" });
      const response = await speech({ input: text, ...body }, options);
      const error = await expectError(response, 429, { code: "rate_limit_exceeded", type: "requests" });
      expect(error.message).toMatch(/try again in 7 s/);
      expect(response.headers.get("retry-after")).toBe("7");
      expect(response.headers.has("x-should-retry")).toBe(false);
      expect(await jobs(text)).toEqual([]);
      expect(await refused(text)).toBe(1);
      // The client's retry goes through.
      const again = await speech({ input: text, ...body }, options);
      expect(again.status).toBe(200);
      await again.arrayBuffer();
      expect(await jobs(text)).toHaveLength(1);
    });
  }
});

describe("every error but a refused submission stops the SDKs' retries", () => {
  it("sets x-should-retry: false on errors before, during and after a job", async () => {
    const cases = [
      [{ input: uniqueText(), speed: 9 }, {}, 400],
      [{ input: uniqueText(), voice: { id: "voice_0123456789abcdef01234567" } }, {}, 404],
      [{ input: uniqueText() }, { envOverrides: { RUNPOD_API_KEY: undefined } }, 503],
    ];
    for (const [body, options, status] of cases) {
      const response = await speech(body, options);
      await expectError(response, status);
      expect(response.headers.get("x-should-retry"), String(status)).toBe("false");
    }
    for (const [planned, status] of [
      [{ fail: "internal error while generating audio (X); the job was not completed." }, 502],
      [{ fail: "'diffusion_steps' must be an integer from 1 to 50 (got 99)." }, 400],
      [{ status: "TIMED_OUT" }, 504],
      [{ http: { run: 503, runsync: 503 } }, 502],
      [{ polls: 9, limited: { status: 9 } }, 429],
    ]) {
      const text = uniqueText();
      await plan(text, planned);
      const response = await speech({ input: text }, WHOLE);
      await expectError(response, status);
      expect(response.headers.get("x-should-retry"), JSON.stringify(planned)).toBe("false");
    }
  });
});

describe("job states", () => {
  it("streams a job that reads RUNNING while it works", async () => {
    const text = uniqueText();
    await plan(text, { running: true, chunks: ["x", "y", "z"], hold: 1 });
    const response = await speech({ input: text, stream_format: "audio" });
    const reader = response.body.getReader();
    expect(textOf((await reader.read()).value)).toBe("x");
    const { release } = await import("./helpers.js");
    await release(text);
    let rest = "";
    for (let part = await reader.read(); !part.done; part = await reader.read()) rest += textOf(part.value);
    expect(rest).toBe("yz");
  });
});

describe("split stream backlogs", () => {
  it("reads on past the first final reply until one brings no items: audio", async () => {
    const text = uniqueText();
    const chunks = ["c0 ", "c1 ", "c2 ", "c3 ", "c4 ", "c5 ", "c6"];
    await plan(text, { chunks, split: 2 });
    const response = await speech({ input: text, stream_format: "audio" });
    expect(textOf(await response.arrayBuffer())).toBe(chunks.join(""));
    const [job] = await jobs(text);
    expect(job.calls.filter((call) => call === "stream")).toHaveLength(5); // 2+2+2+2 items, then an empty one
  });

  it("and as server-sent events, with the summary's usage", async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["a", "b", "c", "d", "e"], split: 1 });
    const events = parseSse(await (await speech({ input: text, stream_format: "sse" })).text());
    expect(events.filter((event) => event.type === "speech.audio.delta").map((event) => atob(event.audio))).toEqual([
      "a",
      "b",
      "c",
      "d",
      "e",
    ]);
    expect(events.at(-1)).toMatchObject({ type: "speech.audio.done", usage: { output_tokens: 15 } });
  });
});

describe("a lost /stream reply", () => {
  // RunPod handed the reply's items out, the reply never arrived, the next read brings later items.
  // The job's final output (/status) holds every item: the gap is filled from it.
  for (const [lost, format] of [
    [1, "audio"],
    [2, "audio"],
    [1, "sse"],
  ]) {
    it(`is filled from the job's final output (item ${lost} of 3, stream_format ${format})`, async () => {
      vi.spyOn(console, "warn").mockImplementation(() => {});
      const text = uniqueText();
      await plan(text, { chunks: ["a", "b", "c"], lose: lost, polls: 2 });
      const response = await speech({ input: text, stream_format: format });
      expect(response.status).toBe(200);
      if (format === "sse") {
        const events = parseSse(await response.text());
        expect(events.filter((e) => e.type === "speech.audio.delta").map((e) => atob(e.audio))).toEqual([
          "a",
          "b",
          "c",
        ]);
        expect(events.at(-1).type).toBe("speech.audio.done");
      } else {
        expect(textOf(await response.arrayBuffer())).toBe("abc");
      }
      await response.settled();
      const [job] = await jobs(text);
      expect(job.polls).toBe(2); // /status, until the job had ended
      expect(job.cancels).toBe(0);
    });
  }
});

describe("lost audio is never a shorter 200", () => {
  it("ends an SSE stream with an error event naming the loss, and logs it", async () => {
    const logged = vi.spyOn(console, "warn").mockImplementation(() => {});
    const text = uniqueText();
    // The last item, which only the summary's count shows; the final output lacks it too.
    await plan(text, { chunks: ["a", "b", "c"], lose: 2, aggregate: "emptied" });
    const events = parseSse(await (await speech({ input: text, stream_format: "sse" })).text());
    expect(events.map((event) => event.type)).toEqual(["speech.audio.delta", "speech.audio.delta", "error"]);
    expect(events.at(-1).error).toMatchObject({ code: "upstream_incomplete", type: "server_error" });
    expect(events.at(-1).error.message).toMatch(/2 of 3 audio items arrived/);
    expect(logged.mock.calls.flat().join(" ")).toMatch(/ended early \(upstream_incomplete\)/);
  });

  it("breaks a raw stream whose middle item is missing", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const text = uniqueText();
    await plan(text, { chunks: ["a", "b", "c"], lose: 1, aggregate: "emptied" });
    const response = await speech({ input: text, stream_format: "audio" });
    await expect(response.arrayBuffer()).rejects.toThrow();
  });
});

describe("captions", () => {
  it("are asked of the worker and come back in a header of a whole file", async () => {
    const text = uniqueText();
    const response = await speech({ input: text, captions: "vtt" });
    expect(response.status).toBe(200);
    expect(atob(response.headers.get("x-vibevoice-captions"))).toBe("captions:vtt");
    const [job] = await jobs(text);
    expect(job.op).toBe("runsync"); // no stream_format: a whole file, which can carry them
    expect(job.input.captions).toBe("vtt");
  });

  it("come in speech.audio.done of an SSE stream", async () => {
    const text = uniqueText();
    const events = parseSse(await (await speech({ input: text, stream_format: "sse", captions: "srt" })).text());
    expect(events.at(-1)).toMatchObject({ type: "speech.audio.done", captions: "captions:srt" });
    expect((await jobs(text))[0]).toMatchObject({ op: "run", input: { captions: "srt", stream: true } });
  });

  it("a wrong value is the worker's 400, naming captions", async () => {
    const text = uniqueText();
    await plan(text, { fail: "'captions' must be 'srt' or 'vtt' (got 'ass')." });
    await expectError(await speech({ input: text, captions: "ass" }), 400, { param: "captions" });
  });
});
