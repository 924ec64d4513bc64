// POST /v1/audio/speech: OpenAI's request in, raw audio (or server-sent events) out.
//
//   whole file   /runsync (+ /status polling), then the audio from the presigned URL or base64;
//   audio        /run with "stream": true; bytes go to the client as /stream items arrive;
//   sse          the same items as speech.audio.delta events, then one speech.audio.done.
// Failures before the first audio byte get their proper status. After it, a reply is never left
// looking complete: a raw stream is broken off (the client sees an incomplete transfer) and an
// SSE stream ends with an "error" event; both are logged. Whatever ends a request early, its
// RunPod job is cancelled (lifecycle.js). An SSE reply whose first audio takes longer than
// SSE_KEEPALIVE_SECONDS (a job queued behind a cold start) starts with keep-alive comments instead.

import { ApiError, invalid } from "./errors.js";
import { EXTRAS, RETURNED, returnedHeader } from "./extras.js";
import { FORMATS, FORMAT_NAMES } from "./formats.js";
import { readJsonObject, toBase64 } from "./http.js";
import { KEEP_ALIVE, KEEP_ALIVE_COMMENT, withKeepAlive } from "./keepalive.js";
import { JobTie } from "./lifecycle.js";
import { audioPieces, checkFormat, chunksOf } from "./pieces.js";
import { CallerGone, RunPod } from "./runpod.js";
import { parseSpeakers, parseVoice, resolveVoices } from "./speakers.js";
import { timedReply, wantsTimestamps } from "./timed_speech.js";
import { VoiceStore } from "./voices.js";

// Every name runs the same VibeVoice model. Any other name is accepted too (OpenAI types `model`
// as any string, and clients come configured for other servers): it runs DEFAULT_MODEL, and the
// reply's x-vibevoice-model header says so.
export const MODELS = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15", "vibevoice-7b"];
export const DEFAULT_MODEL = "vibevoice-7b";
const MODEL_NAME_MAX = 256;
// VibeVoice's acoustic tokenizer runs at 7.5 frames per second; usage counts those frames.
const FRAMES_PER_SECOND = 7.5;
// What the worker refuses in text: control characters other than tab and line breaks, and lone
// surrogates (what broken escapes decode to). Same rule as the worker's schema.check_printable.
// eslint-disable-next-line no-control-regex
const UNPRINTABLE = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]|\p{Surrogate}/u;

// `caller`: who asks ({owner, admin}, keys.js); created voices resolve only for their owner.
export async function createSpeech(request, env, ctx, config, caller) {
  const body = await readJsonObject(request, config.MAX_REQUEST_BYTES);
  const speech = parseSpeechRequest(body, config);
  RunPod.requireConfigured(config);
  const voice = await resolveVoices(new VoiceStore(env.VOICES, config, caller), speech);
  const format = FORMATS[speech.responseFormat];
  const mode = speech.timestamps ? "timed" : deliveryMode(speech, format, config);
  const job = {
    input: {
      text: speech.input,
      ...voice,
      output_format: format.worker,
      ...(format.sampleRate ? { sample_rate: format.sampleRate } : {}),
      ...(speech.speed !== undefined ? { speed: speech.speed } : {}),
      ...speech.extras,
      ...(mode === "stream" ? speech.streamExtras : {}),
      ...(mode === "timed" ? { timestamps: "word" } : {}),
      return: "auto",
    },
    characters: [...speech.input].length,
  };
  const headers = {
    "content-type": format.contentType,
    "cache-control": "no-store",
    "content-disposition": `inline; filename="speech.${speech.responseFormat}"`,
    "x-vibevoice-model": speech.model,
  };
  // VibeVoice has no instruction input: the text is spoken as written, and the reply says so.
  if (speech.instructions !== undefined) headers["x-vibevoice-ignored"] = "instructions";

  const runpod = new RunPod(config);
  const tie = new JobTie(runpod, request, ctx);
  try {
    if (mode === "stream") return await streamed(runpod, tie, job, format, headers, speech, ctx);
    return await wholeFile(runpod, tie, job, format, headers, speech, ctx);
  } catch (error) {
    tie.abandon(error);
    tie.finish();
    throw error;
  }
}

// "whole": one file from /runsync; "stream": /run + /stream items, as raw bytes or as SSE;
// "timed" (`"timestamps": true`): a whole file with the words' times, as JSON (timed_speech.js).
function deliveryMode(speech, format, config) {
  const wantsReturned = RETURNED.some((name) => name in speech.extras);
  if (!format.streams) return "whole";
  if (speech.streamFormat === "sse") return "stream";
  if (speech.streamFormat === "audio") {
    if (wantsReturned) {
      const name = RETURNED.find((field) => field in speech.extras);
      throw invalid(
        `'${name}' cannot come with a raw audio stream; use stream_format 'sse' or leave stream_format out.`,
        name,
      );
    }
    return "stream";
  }
  return config.STREAM_AUDIO && !wantsReturned ? "stream" : "whole";
}

async function wholeFile(runpod, tie, job, format, headers, speech, ctx) {
  const deadline = runpod.deadline();
  const submitted = await tie.submit(() =>
    runpod.submit(job.input, { sync: true, deadline, characters: job.characters }),
  );
  headers["x-runpod-job-id"] = submitted.id;
  if (speech.streamFormat === "sse" && !speech.timestamps) {
    const summary = {};
    const pieces = fileAsPieces(runpod, tie, submitted, format, deadline, summary);
    return sseReply(pieces, summary, speech, headers, ctx, tie, runpod.config);
  }
  const { result, audio } = await finishedAudio(runpod, tie, submitted, format, deadline);
  if (speech.timestamps) {
    tie.finish();
    return timedReply(audio.stream, result, format, speech.responseFormat, headers);
  }
  for (const name of RETURNED) {
    if (result[name] !== undefined) headers[returnedHeader(name)] = encodeReturned(result[name]);
  }
  tie.finish();
  return new Response(exactLength(audio, ctx), {
    headers: { ...headers, ...(audio.size !== null ? { "content-length": String(audio.size) } : {}) },
  });
}

// A body of known size goes out with its Content-Length (a FixedLengthStream: one that ends
// short breaks the transfer); one of unknown size is chunked.
function exactLength(audio, ctx) {
  if (audio.size === null) return audio.stream;
  const { readable, writable } = new FixedLengthStream(audio.size);
  ctx?.waitUntil?.(audio.stream.pipeTo(writable).catch((error) => logEarlyEnd("audio file", null, error)));
  return readable;
}

async function streamed(runpod, tie, job, format, headers, speech, ctx) {
  const deadline = runpod.deadline();
  const input = { ...job.input, stream: true };
  const submitted = await tie.submit(() => runpod.submit(input, { sync: false, deadline, characters: job.characters }));
  headers["x-runpod-job-id"] = submitted.id;
  const summary = {};
  const pieces = audioPieces(runpod, tie, submitted.id, format, deadline, summary);
  if (speech.streamFormat === "sse") return sseReply(pieces, summary, speech, headers, ctx, tie, runpod.config);
  // The wait for the first byte: queueing, a cold start, the first decoded frames.
  const first = await pieces.next();
  if (first.done) throw noAudio();
  return rawResponse(prepend(first.value, pieces), headers, ctx, tie);
}

// An SSE reply starts with the first audio, or, when none has come within SSE_KEEPALIVE_SECONDS (a job
// queued behind a cold start), with a keep-alive comment, repeated until the audio comes; a failure
// after that arrives as an `error` event, like any failure once a stream has started.
async function sseReply(pieces, summary, speech, headers, ctx, tie, config) {
  const waiting = withKeepAlive(pieces, config.SSE_KEEPALIVE_SECONDS * 1000);
  const first = await waiting.next();
  if (first.done) throw noAudio();
  return sseResponse(prepend(first.value, waiting), summary, speech, headers, ctx, tie);
}

// A whole-file job's audio once it has finished (it may wait in the queue first), as a stream from
// the worker's storage: passed through, never held whole (runpod.openAudio).
async function finishedAudio(runpod, tie, submitted, format, deadline) {
  const finished = await runpod.pollStatus(submitted, { deadline, signal: tie.signal });
  tie.settle();
  const { result, audio } = await runpod.openAudio(finished.output, deadline, tie.signal);
  checkFormat(result, format);
  return { result, audio };
}

// The same as pieces for an SSE reply, as they arrive; fills `summary` with the worker's result.
async function* fileAsPieces(runpod, tie, submitted, format, deadline, summary) {
  const { result, audio } = await finishedAudio(runpod, tie, submitted, format, deadline);
  Object.assign(summary, result);
  for await (const bytes of chunksOf(audio.stream)) yield { bytes, base64: null };
}

function noAudio() {
  return new ApiError(502, "The worker finished without sending audio.", { code: "upstream_bad_output" });
}

export function parseSpeechRequest(body, config) {
  const { model, input, voice, instructions, response_format, speed, stream_format } = body;
  if (model === undefined || model === null || model === "") throw invalid("'model' is required.", "model");
  if (typeof model !== "string") throw invalid("'model' must be a string.", "model");
  if (model.length > MODEL_NAME_MAX) {
    throw invalid(`'model' is longer than ${MODEL_NAME_MAX} characters.`, "model", "string_above_max_length");
  }
  if (input === undefined || input === null) throw invalid("'input' is required: give the text to speak.", "input");
  if (typeof input !== "string") throw invalid("'input' must be a string.", "input");
  if (!input.trim()) throw invalid("'input' is empty; give the text to speak.", "input");
  checkText(input, config.MAX_TEXT_LENGTH);
  const speakers = parseSpeakers(body.speakers);
  const hasVoice = voice !== undefined && voice !== null;
  if (!hasVoice && !speakers) throw invalid("'voice' is required.", "voice");
  const parsedVoice = hasVoice ? parseVoice(voice) : undefined;
  if (instructions !== undefined && instructions !== null && typeof instructions !== "string") {
    throw invalid("'instructions' must be a string.", "instructions");
  }
  const responseFormat = response_format ?? "mp3";
  if (!FORMAT_NAMES.includes(responseFormat)) {
    throw invalid(
      `'response_format' must be one of ${FORMAT_NAMES.join(", ")} (got ${shown(responseFormat)}).`,
      "response_format",
    );
  }
  if (speed !== undefined && speed !== null) {
    if (typeof speed !== "number" || !Number.isFinite(speed) || speed < 0.25 || speed > 4) {
      throw invalid(`'speed' must be a number from 0.25 to 4.0 (got ${shown(speed)}).`, "speed");
    }
  }
  const streamFormat = stream_format ?? undefined;
  if (streamFormat !== undefined && streamFormat !== "audio" && streamFormat !== "sse") {
    throw invalid(`'stream_format' must be 'audio' or 'sse' (got ${shown(streamFormat)}).`, "stream_format");
  }
  const extras = {};
  const streamExtras = {};
  for (const [name, { streamedOnly }] of Object.entries(EXTRAS)) {
    if (body[name] !== undefined && body[name] !== null) (streamedOnly ? streamExtras : extras)[name] = body[name];
  }
  return {
    model: MODELS.includes(model) ? model : DEFAULT_MODEL,
    input,
    voice: parsedVoice,
    speakers,
    instructions: instructions ?? undefined,
    responseFormat,
    speed: speed ?? undefined,
    streamFormat,
    extras,
    streamExtras,
    timestamps: wantsTimestamps(body),
  };
}

// The worker's own text rules, checked before a GPU job is queued.
function checkText(input, limit) {
  const length = [...input].length;
  if (length > limit) {
    throw invalid(`'input' is ${length} characters long; the limit is ${limit}.`, "input", "string_above_max_length");
  }
  const match = UNPRINTABLE.exec(input);
  if (match) {
    const position = [...input.slice(0, match.index)].length;
    const code = match[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    const what = /\p{Surrogate}/u.test(match[0])
      ? "invalid Unicode (a lone surrogate)"
      : `the control character U+${code}`;
    throw invalid(`'input' contains ${what} at position ${position}.`, "input", "invalid_characters");
  }
}

function rawResponse(pieces, headers, ctx, tie) {
  const { readable, writable } = new TransformStream();
  const writer = writable.getWriter();
  const pump = (async () => {
    try {
      for await (const piece of pieces) await write(writer, piece.bytes, tie);
      await writer.close();
    } catch (error) {
      // The client went away, or the job failed or lost audio after bytes were sent: stop the
      // job and break the transfer, so the client cannot take part of a file for all of it.
      tie.abandon(error);
      logEarlyEnd("audio stream", tie, error);
      await writer.abort(error).catch(() => {});
    } finally {
      tie.finish();
    }
  })();
  ctx?.waitUntil?.(pump);
  return new Response(readable, { headers });
}

function sseResponse(pieces, summary, speech, headers, ctx, tie) {
  const { readable, writable } = new TransformStream();
  const writer = writable.getWriter();
  const encoder = new TextEncoder();
  // As OpenAI sends them: an `event:` line naming the type, then the JSON.
  const send = (event) =>
    write(writer, encoder.encode(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`), tie);
  const pump = (async () => {
    try {
      for await (const piece of pieces) {
        if (piece === KEEP_ALIVE) await write(writer, encoder.encode(KEEP_ALIVE_COMMENT), tie);
        else await send({ type: "speech.audio.delta", audio: piece.base64 ?? toBase64(piece.bytes) });
      }
      await send(doneEvent(summary, speech));
      await writer.close();
    } catch (error) {
      tie.abandon(error);
      logEarlyEnd("event stream", tie, error);
      if (error instanceof CallerGone) {
        await writer.abort(error).catch(() => {});
      } else {
        const apiError =
          error instanceof ApiError ? error : new ApiError(502, "The stream failed.", { code: "stream_failed" });
        await send({ type: "error", error: apiError.toJSON().error })
          .then(() => writer.close())
          .catch(() => writer.abort(error).catch(() => {}));
      }
    } finally {
      tie.finish();
    }
  })();
  ctx?.waitUntil?.(pump);
  const { "content-disposition": _file, ...eventHeaders } = headers; // events, not a file
  return new Response(readable, {
    headers: { ...eventHeaders, "content-type": "text/event-stream", "cache-control": "no-cache" },
  });
}

// speech.audio.done: usage (input characters; output in VibeVoice speech frames, as VibeVoice has
// no OpenAI tokens), and the returned extras the worker produced.
function doneEvent(summary, speech) {
  const characters = [...speech.input].length;
  const outputTokens = Math.ceil((Number(summary.duration_sec) || 0) * FRAMES_PER_SECOND - 1e-6);
  const event = {
    type: "speech.audio.done",
    usage: { input_tokens: characters, output_tokens: outputTokens, total_tokens: characters + outputTokens },
  };
  for (const name of RETURNED) if (summary[name] !== undefined) event[name] = summary[name];
  return event;
}

// A failed write means the client is gone.
async function write(writer, bytes, tie) {
  try {
    await writer.write(bytes);
  } catch {
    tie.callerGone("a write to the client failed");
    throw new CallerGone();
  }
}

function logEarlyEnd(what, tie, error) {
  const why = error instanceof CallerGone ? "the client went away" : error?.code || error?.name || "error";
  const job = tie ? `of job ${tie.id} ` : "";
  console.warn(`bridge: ${what} ${job}ended early (${why}); the reply is marked incomplete`);
}

function encodeReturned(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return toBase64(new TextEncoder().encode(text));
}

async function* prepend(first, rest) {
  yield first;
  yield* rest;
}

function shown(value) {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 40 ? text.slice(0, 37) + "..." : text;
}
