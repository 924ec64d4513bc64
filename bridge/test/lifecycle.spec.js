// No RunPod job outlives its caller: a disconnect at every stage, in every mode, cancels the job;
// so does every way the bridge can stop following a job. Jobs that end normally are left alone.
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { disconnectable, expectError, jobs, plan, speech, textOf, uniqueText, waitForJob } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

// Each way a speech request can run, and the RunPod call that starts its job.
const MODES = {
  "whole file": { body: { response_format: "mp3" }, env: { STREAM_AUDIO: "false" }, submit: "runsync" },
  "whole file as SSE": { body: { response_format: "flac", stream_format: "sse" }, submit: "runsync" },
  "audio stream": { body: { response_format: "pcm", stream_format: "audio" }, submit: "run" },
  "SSE stream": { body: { response_format: "mp3", stream_format: "sse" }, submit: "run" },
  "word timestamps": { body: { timestamps: true }, submit: "runsync" },
};

async function expectCancelled(text, request) {
  const response = await request.response;
  expect(response.status).toBe(499); // nobody reads it: the client is gone
  await request.settled();
  const [job] = await jobs(text);
  expect(job.cancelled).toBe(true);
  expect(job.cancels).toBe(1);
  return job;
}

for (const [name, mode] of Object.entries(MODES)) {
  describe(`${name}: a disconnect cancels the job`, () => {
    it(`while RunPod's /${mode.submit} has not answered yet`, async () => {
      const text = uniqueText();
      await plan(text, { never: true, delay: { [mode.submit]: 300 } });
      const request = disconnectable({ input: text, ...mode.body }, { envOverrides: mode.env });
      await waitForJob(text); // the job exists on RunPod; its id is not back yet
      request.abort();
      await expectCancelled(text, request);
    });

    it("while the job waits in the queue, before the first byte", async () => {
      const text = uniqueText();
      await plan(text, { never: true });
      const request = disconnectable({ input: text, ...mode.body }, { envOverrides: mode.env });
      await waitForJob(text, (job) => job.calls.length >= 3); // polled a few times
      request.abort();
      const job = await expectCancelled(text, request);
      // Polling stopped with the disconnect.
      const calls = job.calls.length;
      await new Promise((resolve) => setTimeout(resolve, 150));
      expect((await jobs(text))[0].calls.length).toBe(calls);
    });

    it("never when the client stays to the end", async () => {
      const text = uniqueText();
      await plan(text, { polls: 2, chunks: ["a", "b"] });
      const response = await speech({ input: text, ...mode.body }, { envOverrides: mode.env });
      expect(response.status).toBe(200);
      await response.arrayBuffer();
      await response.settled();
      const [job] = await jobs(text);
      expect(job.cancels).toBe(0);
    });
  });
}

for (const name of ["audio stream", "SSE stream"]) {
  const mode = MODES[name];
  it(`${name}: a disconnect after the first byte cancels the job`, async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["one", "two", "three"], hold: 1 });
    const request = disconnectable({ input: text, ...mode.body });
    const response = await request.response;
    expect(response.status).toBe(200);
    const reader = response.body.getReader();
    expect(textOf((await reader.read()).value)).toMatch(/one|speech\.audio\.delta/);
    request.abort();
    await request.settled();
    const [job] = await jobs(text);
    expect(job.cancelled).toBe(true);
    await expect(reader.read()).rejects.toThrow(); // the transfer is broken, not ended
  });
}

describe("a job the bridge stops following is cancelled", () => {
  const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };

  it("when /status keeps failing after its retries", async () => {
    const text = uniqueText();
    await plan(text, { polls: 50, http: { status: 503 } });
    const response = await speech({ input: text }, WHOLE);
    await expectError(response, 502, { message: /HTTP 503 to \/status/ });
    expect(response.headers.get("x-should-retry")).toBe("false");
    await response.settled();
    const [job] = await jobs(text);
    expect(job.calls.filter((call) => call === "status")).toHaveLength(5); // RETRY_ATTEMPTS 4, plus the first
    expect(job.cancelled).toBe(true);
  });

  it("when /stream keeps failing after its retries", async () => {
    const text = uniqueText();
    await plan(text, { http: { stream: 500 } });
    const response = await speech({ input: text, stream_format: "audio" });
    await expectError(response, 502, { message: /HTTP 500 to \/stream/ });
    await response.settled();
    expect((await jobs(text))[0].cancelled).toBe(true);
  });

  it("when RunPod no longer knows the job, or reports a status nobody documented", async () => {
    for (const [planned, message] of [
      [{ polls: 5, http: { status: 404 } }, /no longer knows the job/],
      [{ status: "PAUSED" }, /unknown job status/],
    ]) {
      const text = uniqueText();
      await plan(text, planned);
      const response = await speech({ input: text }, WHOLE);
      await expectError(response, 502, { message });
      await response.settled();
      expect((await jobs(text))[0].cancels).toBe(1);
    }
  });

  it("when a streamed job loses audio: the transfer breaks once the job has ended, with nothing to cancel", async () => {
    // The bridge reads the lost item from the job's final output, which it waits for: here the
    // output holds emptied items (a result past RunPod's limit), so the audio is lost for good.
    const text = uniqueText();
    await plan(text, { chunks: ["a", "b", "c", "d"], lose: 1, hold: 3, aggregate: "emptied", polls: 2 });
    const response = await speech({ input: text, stream_format: "audio" });
    expect(response.status).toBe(200);
    await expect(response.arrayBuffer()).rejects.toThrow();
    await response.settled();
    const [job] = await jobs(text);
    expect(job.polls).toBe(2); // /status was read until the job ended
    expect(job.cancels).toBe(0);
  });

  it("when a streamed job loses audio and its deadline passes first: the job is cancelled", async () => {
    const text = uniqueText();
    await plan(text, { chunks: ["a", "b", "c", "d"], lose: 1, hold: 3, polls: 1000 });
    const response = await speech(
      { input: text, stream_format: "audio" },
      { envOverrides: { JOB_TIMEOUT_SECONDS: "1" } },
    );
    expect(response.status).toBe(200);
    await expect(response.arrayBuffer()).rejects.toThrow();
    await response.settled();
    expect((await jobs(text))[0].cancelled).toBe(true);
  });

  it("retrying /cancel a few times, then leaving the job to its TTL", async () => {
    let text = uniqueText();
    await plan(text, { never: true, flaky: { cancel: 2 } });
    let response = await speech({ input: text }, { envOverrides: { STREAM_AUDIO: "false", JOB_TIMEOUT_SECONDS: "1" } });
    await expectError(response, 504);
    await response.settled();
    const [retried] = await jobs(text);
    expect(retried.calls.filter((call) => call === "cancel")).toHaveLength(3); // two 503s, then done
    expect(retried.cancelled).toBe(true);

    const logged = vi.spyOn(console, "error").mockImplementation(() => {});
    text = uniqueText();
    await plan(text, { never: true, http: { cancel: 503 } });
    response = await speech({ input: text }, { envOverrides: { STREAM_AUDIO: "false", JOB_TIMEOUT_SECONDS: "1" } });
    await expectError(response, 504);
    await response.settled();
    const [job] = await jobs(text);
    expect(job.calls.filter((call) => call === "cancel")).toHaveLength(4); // CANCEL_ATTEMPTS
    expect(job.policy.ttl).toBe(31_000); // what ends it instead: 1 s + TTL_MARGIN_SECONDS
    expect(logged.mock.calls.flat().join(" ")).toMatch(/could not cancel job/);
  });
});
