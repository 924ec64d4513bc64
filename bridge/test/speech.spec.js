// POST /v1/audio/speech against the RunPod stand-in: fields, formats, whole files, errors, deadlines.
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { expectError, jobs, plan, speech, textOf, uniqueText } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

const WHOLE = { envOverrides: { STREAM_AUDIO: "false" } };

describe("request validation", () => {
  const cases = [
    [{ model: undefined }, "model"],
    [{ model: 7 }, "model"],
    [{ model: "m".repeat(257) }, "model", "string_above_max_length"],
    [{ input: undefined }, "input"],
    [{ input: "   " }, "input"],
    [{ input: 42 }, "input"],
    [{ input: "x".repeat(4097) }, "input", "string_above_max_length"],
    [{ voice: undefined }, "voice"],
    [{ voice: 3 }, "voice"],
    [{ voice: { name: "alloy" } }, "voice"],
    [{ voice: "" }, "voice"],
    [{ instructions: ["calm"] }, "instructions"],
    [{ response_format: "ogg" }, "response_format"],
    [{ speed: 0.2 }, "speed"],
    [{ speed: 4.5 }, "speed"],
    [{ speed: "fast" }, "speed"],
    [{ stream_format: "chunks" }, "stream_format"],
  ];
  for (const [fields, param, code] of cases) {
    it(`refuses ${JSON.stringify(fields).slice(0, 60)} with 400 naming '${param}'`, async () => {
      const text = uniqueText();
      const response = await speech({ input: text, ...fields });
      const error = await expectError(response, 400, { param, type: "invalid_request_error" });
      if (code) expect(error.code).toBe(code);
      expect(error.message).toMatch(new RegExp(`'${param}'`));
      expect(await jobs(text)).toEqual([]); // nothing reached RunPod
    });
  }

  it("refuses a body that is not JSON, or not an object", async () => {
    await expectError(await speech(undefined, { body: "{nope" }), 400, { param: null });
    await expectError(
      await speech(undefined, { body: "[1, 2]", headers: { "content-type": "application/json" } }),
      400,
      { message: /JSON object/ },
    );
  });

  it("refuses a body over the size cap with 413, declared or streamed", async () => {
    const big = JSON.stringify({ model: "tts-1", voice: "alloy", input: "x".repeat(70_000) });
    await expectError(await speech(undefined, { body: big }), 413, { code: "request_too_large" });
    const stream = new ReadableStream({
      start(controller) {
        for (let i = 0; i < 20; i++) controller.enqueue(new TextEncoder().encode(" ".repeat(5000)));
        controller.close();
      },
    });
    await expectError(await speech(undefined, { body: stream, headers: { "content-type": "application/json" } }), 413);
  });

  it("accepts 4096 characters, the OpenAI names and the project's model, and speed at both ends", async () => {
    for (const [model, speed] of [
      ["tts-1-hd", 0.25],
      ["gpt-4o-mini-tts", 4.0],
      ["vibevoice-7b", 1],
    ]) {
      const text = uniqueText().padEnd(4096, "a");
      const response = await speech({ model, input: text, speed, response_format: "flac" });
      expect(response.status).toBe(200);
      const [job] = await jobs(text);
      expect(job.input.speed).toBe(speed);
      expect(job.input.text).toBe(text);
    }
  });
});

describe("models", () => {
  it("runs any model name: known ones as given, others as the default, and says which", async () => {
    for (const [model, used] of [
      ["tts-1", "tts-1"],
      ["gpt-4o-mini-tts", "gpt-4o-mini-tts"],
      ["kokoro", "vibevoice-7b"],
      ["whisper-1", "vibevoice-7b"],
    ]) {
      const text = uniqueText();
      const response = await speech({ model, input: text }, WHOLE);
      expect(response.status).toBe(200);
      expect(response.headers.get("x-vibevoice-model")).toBe(used);
      expect((await jobs(text)).length).toBe(1);
    }
  });
});

describe("the worker's limits, checked first", () => {
  it("refuses text over MAX_TEXT_LENGTH, in characters, before a job starts", async () => {
    const text = uniqueText().padEnd(2001, "é");
    const error = await expectError(await speech({ input: text }, { envOverrides: { MAX_TEXT_LENGTH: "2000" } }), 400, {
      param: "input",
      code: "string_above_max_length",
    });
    expect(error.message).toBe("'input' is 2001 characters long; the limit is 2000.");
    expect(await jobs(text)).toEqual([]);
    const start = uniqueText();
    const fits = start + "😀".repeat(2000 - start.length); // 2000 characters, 4000 UTF-16 units
    expect(
      (await speech({ input: fits }, { envOverrides: { MAX_TEXT_LENGTH: "2000", ...WHOLE.envOverrides } })).status,
    ).toBe(200);
  });

  it("refuses control characters and lone surrogates, as the worker would; keeps tabs and line breaks", async () => {
    for (const [bad, what] of [
      ["\u0000", "U+0000"],
      ["\u001b", "U+001B"],
      ["\u0085", "U+0085"],
      ["\ud83d", "lone surrogate"],
    ]) {
      const text = uniqueText() + bad + "after";
      const error = await expectError(await speech({ input: text }), 400, {
        param: "input",
        code: "invalid_characters",
      });
      expect(error.message).toContain(what);
      expect(error.message).toContain(`at position ${[...text].indexOf([...bad][0])}`);
      if (what !== "lone surrogate") expect(await jobs(text)).toEqual([]);
    }
    const text = uniqueText() + "\tone\r\ntwo\n";
    expect((await speech({ input: text }, WHOLE)).status).toBe(200);
  });

  it("refuses preset names the endpoint does not have, with PRESET_VOICES set", async () => {
    const presets = { PRESET_VOICES: "en-Alice_woman, en-Frank_man, de-Anna_woman", STREAM_AUDIO: "false" };
    for (const voice of ["Alice", "frank", "EN-ALICE_WOMAN", "anna"]) {
      const text = uniqueText();
      expect((await speech({ input: text, voice }, { envOverrides: presets })).status, voice).toBe(200);
      expect((await jobs(text))[0].input.speaker).toBe(voice);
    }
    const text = uniqueText();
    const error = await expectError(await speech({ input: text, voice: "Bob" }, { envOverrides: presets }), 400, {
      param: "voice",
      code: "voice_not_found",
    });
    expect(error.message).toBe(
      "'voice': unknown voice 'Bob'; available voices: en-Alice_woman, en-Frank_man, de-Anna_woman.",
    );
    expect(await jobs(text)).toEqual([]);
  });
});

describe("whole files", () => {
  const expected = {
    mp3: ["mp3", 24000, "audio/mpeg"],
    opus: ["opus", undefined, "audio/opus"],
    aac: ["aac", 24000, "audio/aac"],
    flac: ["flac", 24000, "audio/flac"],
    wav: ["wav", 24000, "audio/wav"],
    pcm: ["pcm_16", 24000, "audio/pcm"],
  };
  for (const [format, [workerFormat, rate, contentType]] of Object.entries(expected)) {
    it(`${format}: asks the worker for ${workerFormat} at ${rate ?? "48000 (Opus)"} Hz and answers ${contentType}`, async () => {
      const text = uniqueText(format);
      const response = await speech({ input: text, response_format: format }, WHOLE);
      expect(response.status).toBe(200);
      expect(response.headers.get("content-type")).toBe(contentType);
      const body = textOf(await response.arrayBuffer());
      expect(body).toBe(`AUDIO:${workerFormat}:${text}`);
      expect(response.headers.get("content-length")).toBe(String(body.length));
      expect(response.headers.get("content-disposition")).toBe(`inline; filename="speech.${format}"`);
      const [job] = await jobs(text);
      expect(job.op).toBe("runsync");
      expect(job.input.output_format).toBe(workerFormat);
      expect(job.input.sample_rate).toBe(rate);
      expect(job.input.return).toBe("auto");
      expect(job.input).not.toHaveProperty("stream");
      expect(response.headers.get("x-runpod-job-id")).toBe(job.id);
    });
  }

  it("defaults to mp3 and sends the voice as a preset name", async () => {
    const text = uniqueText();
    const response = await speech({ input: text, voice: "Frank" }, WHOLE);
    expect(response.headers.get("content-type")).toBe("audio/mpeg");
    const [job] = await jobs(text);
    expect(job.input).toMatchObject({ text, speaker: "Frank", output_format: "mp3" });
    expect(job.input).not.toHaveProperty("speed");
  });

  it("downloads the audio from the worker's presigned URL", async () => {
    const text = uniqueText();
    await plan(text, { delivery: "url", audio: "bytes from storage" });
    const response = await speech({ input: text, response_format: "wav" }, WHOLE);
    expect(response.status).toBe(200);
    expect(textOf(await response.arrayBuffer())).toBe("bytes from storage");
  });

  it("answers 502 when the download fails, without showing the presigned URL", async () => {
    const text = uniqueText();
    await plan(text, { delivery: "url", http: { audio: 403 } });
    const error = await expectError(await speech({ input: text }, WHOLE), 502);
    expect(error.message).toMatch(/HTTP 403/);
    expect(JSON.stringify(error)).not.toMatch(/Signature|__audio|127\.0\.0\.1/);
  });

  it("polls /status while the job is in progress, RUNNING as well as IN_PROGRESS", async () => {
    for (const running of [false, true]) {
      const text = uniqueText();
      await plan(text, { polls: 3, running });
      const response = await speech({ input: text }, WHOLE);
      expect(response.status).toBe(200);
      const [job] = await jobs(text);
      expect(job.calls).toEqual(["runsync", "status", "status", "status"]);
      expect(Number(job.wait)).toBeGreaterThanOrEqual(1000);
      expect(job.cancels).toBe(0);
    }
  });

  it("sends every job with a policy: a TTL past the bridge's deadline, an execution timeout from the text", async () => {
    const short = uniqueText();
    await speech({ input: short }, WHOLE);
    expect((await jobs(short))[0].policy).toEqual({ ttl: 930_000, executionTimeout: 60_000 + short.length * 200 });
    const long = uniqueText().padEnd(4000, "a");
    await speech({ input: long }, { envOverrides: { ...WHOLE.envOverrides, JOB_TIMEOUT_SECONDS: "600" } });
    expect((await jobs(long))[0].policy).toEqual({ ttl: 630_000, executionTimeout: 600_000 });
    const streamedText = uniqueText();
    await (await speech({ input: streamedText, stream_format: "audio" })).arrayBuffer();
    expect((await jobs(streamedText))[0].policy.ttl).toBe(930_000);
  });

  it("passes VibeVoice's extra fields to the worker and never sends instructions", async () => {
    const text = uniqueText();
    const response = await speech(
      {
        input: text,
        instructions: "Speak like a pirate.",
        seed: 7,
        cfg_scale: 1.5,
        diffusion_steps: 3,
        max_new_tokens: 4,
        unknown_field: 1,
      },
      WHOLE,
    );
    expect(response.status).toBe(200);
    expect(response.headers.get("x-vibevoice-ignored")).toBe("instructions");
    const [job] = await jobs(text);
    expect(job.input).toMatchObject({ seed: 7, cfg_scale: 1.5, diffusion_steps: 3, max_new_tokens: 4 });
    expect(JSON.stringify(job.input)).not.toMatch(/pirate|unknown_field|instructions/);
  });
});

describe("worker and RunPod failures", () => {
  const failures = [
    ["'speed' must be a number from 0.25 to 4.0 (got 9).", 400, "speed"],
    ["'text' is 2500 characters long; the limit is 2000.", 400, "input"],
    ["Field 'text' is required.", 400, "input"],
    ["'speaker': unknown voice 'Bob'; available voices: Alice, Frank.", 400, "voice"],
    ["'voice_audio_base64' audio is shorter than 0.5 s.", 400, "voice"],
    ["'speakers[1]' is an empty voice name.", 400, "voice"],
    ["'diffusion_steps' must be an integer from 1 to 50 (got 99).", 400, "diffusion_steps"],
    ["streaming stopped after 1 item(s): 'speed' must be a number from 0.25 to 4.0 (got 9).", 400, "speed"],
  ];
  for (const [message, status, param] of failures) {
    it(`"${message.slice(0, 50)}" -> ${status}${param ? ` param ${param}` : ""}`, async () => {
      const text = uniqueText();
      await plan(text, { fail: message });
      const error = await expectError(await speech({ input: text }, WHOLE), status, { param });
      expect(error.message).toContain(message);
    });
  }

  // The worker's sentences about its own faults may name its storage, bucket, keys or internals:
  // the client gets the bridge's sentence, the bridge's log the worker's.
  const internal = [
    ["Unknown field 'stream'; allowed fields are: action, text.", "The worker could not run the job."],
    [
      "internal error while generating audio (RuntimeError); the job was not completed.",
      "The worker failed while generating the audio; the job was not completed.",
    ],
    [
      "S3 upload failed: NoSuchBucket (The specified bucket does not exist: http://10.1.2.3:9000/private-bucket/vibevoice/key.mp3).",
      "The worker could not store the audio; the job was not completed.",
    ],
    [
      "the audio could not be uploaded to the endpoint's storage (S3; the cause is in the worker's log).",
      "The worker could not store the audio; the job was not completed.",
    ],
    [
      "streaming stopped after 2 item(s): internal error while generating audio (RuntimeError).",
      "The worker failed while generating the audio; the job was not completed.",
    ],
    [
      "the worker was shut down before the job finished, so no audio was delivered; submit the job again.",
      "The worker was shut down before the job finished; send the request again.",
    ],
    [
      "the worker was shut down before the job started, so nothing was generated; submit the job again.",
      "The worker was shut down before the job finished; send the request again.",
    ],
  ];
  for (const [message, answer] of internal) {
    it(`"${message.slice(0, 50)}" -> 502 in the bridge's words`, async () => {
      const logged = vi.spyOn(console, "warn").mockImplementation(() => {});
      const text = uniqueText();
      await plan(text, { fail: message });
      const response = await speech({ input: text }, WHOLE);
      const error = await expectError(response, 502, { code: "worker_error" });
      expect(error.message).toBe(answer);
      expect(logged.mock.calls.flat().join(" ")).toContain(message.slice(0, 60)); // for the operator
    });
  }

  it("keeps a raised exception's traceback out of the answer", async () => {
    const text = uniqueText();
    const raised = JSON.stringify({
      error_type: "<class 'ValueError'>",
      error_message: "boom",
      error_traceback: "Traceback (most recent call last): secret path",
    });
    await plan(text, { fail: raised });
    const error = await expectError(await speech({ input: text }, WHOLE), 502, { code: "worker_error" });
    expect(error.message).toBe("The worker failed (ValueError).");
  });

  it("maps CANCELLED to 502 and TIMED_OUT to 504, and cancels neither again", async () => {
    for (const [status, code] of [
      ["CANCELLED", 502],
      ["TIMED_OUT", 504],
    ]) {
      const text = uniqueText();
      await plan(text, { status });
      const response = await speech({ input: text }, WHOLE);
      await expectError(response, code);
      await response.settled();
      expect((await jobs(text))[0].cancels).toBe(0);
    }
  });

  it("answers 502 for RunPod HTTP errors, a refused key, an unreachable endpoint and output without audio", async () => {
    let text = uniqueText();
    await plan(text, { http: { runsync: 500 } });
    const failed = await speech({ input: text }, WHOLE);
    await expectError(failed, 502, { message: /HTTP 500/ });
    expect(failed.headers.get("x-should-retry")).toBe("false"); // a job may have started

    text = uniqueText();
    const refused = await speech(
      { input: text },
      { envOverrides: { STREAM_AUDIO: "false", RUNPOD_API_KEY: "wrong-key" } },
    );
    const error = await expectError(refused, 502, { code: "upstream_auth" });
    expect(error.message).not.toContain("wrong-key");

    text = uniqueText();
    const closed = await speech(
      { input: text },
      { envOverrides: { STREAM_AUDIO: "false", RUNPOD_ENDPOINT_URL: "http://127.0.0.1:9/v2/x" } },
    );
    await expectError(closed, 502, { message: /could not be reached/ });

    text = uniqueText();
    await plan(text, { output: [{ status: "completed", format: "mp3" }] });
    await expectError(await speech({ input: text }, WHOLE), 502, { code: "upstream_bad_output" });

    text = uniqueText();
    await plan(text, { format: "wav" });
    await expectError(await speech({ input: text, response_format: "mp3" }, WHOLE), 502, {
      message: /wav audio instead of mp3/,
    });
  });

  it("answers 503 when the RunPod settings are missing", async () => {
    const response = await speech({ input: uniqueText() }, { envOverrides: { RUNPOD_API_KEY: undefined } });
    const error = await expectError(response, 503, { code: "not_configured" });
    expect(error.message).toMatch(/RUNPOD_API_KEY/);
  });

  it("gives up at the job deadline with 504 and cancels the job", async () => {
    const text = uniqueText();
    await plan(text, { never: true });
    const response = await speech(
      { input: text },
      { envOverrides: { STREAM_AUDIO: "false", JOB_TIMEOUT_SECONDS: "1" } },
    );
    await expectError(response, 504, { code: "upstream_timeout" });
    expect(response.headers.get("x-should-retry")).toBe("false");
    await response.settled();
    const [job] = await jobs(text);
    expect(job.cancelled).toBe(true);
    expect(job.polls).toBeGreaterThan(2);
  });

  it("puts a deadline on each upstream call", async () => {
    const text = uniqueText();
    await plan(text, { delay: { runsync: 3000 } });
    const started = Date.now();
    const response = await speech(
      { input: text },
      { envOverrides: { STREAM_AUDIO: "false", UPSTREAM_TIMEOUT_SECONDS: "1", RUNSYNC_WAIT_SECONDS: "1" } },
    );
    await expectError(response, 504, { message: /did not answer \/runsync/ });
    expect(Date.now() - started).toBeLessThan(2900);
  });
});
