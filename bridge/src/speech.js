// POST /v1/audio/speech: OpenAI's request in, raw audio (or server-sent events) out.
//
//   whole file   /runsync (+ /status polling), then the audio from the presigned URL or base64;
//   audio        /run with "stream": true; bytes go to the client as /stream items arrive;
//   sse          the same items as speech.audio.delta events, then one speech.audio.done.
// Failures before the first audio byte get their proper status; after it, a raw stream is
// aborted (the client sees a broken transfer) and an SSE stream ends with an "error" event.

import { ApiError, invalid } from "./errors.js";
import { FORMATS, FORMAT_NAMES } from "./formats.js";
import { fromBase64, readJsonObject, toBase64 } from "./http.js";
import { RunPod } from "./runpod.js";
import { parseSpeakers, parseVoice, resolveVoices } from "./speakers.js";
import { timedSpeech, wantsTimestamps } from "./timed_speech.js";
import { VoiceStore } from "./voices.js";

export const MODELS = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15", "vibevoice-7b"];
export const INPUT_MAX = 4096;
// VibeVoice's acoustic tokenizer runs at 7.5 frames per second; usage counts those frames.
const FRAMES_PER_SECOND = 7.5;
// VibeVoice knobs a client may add to OpenAI's fields (extra_body in the SDKs); the worker checks them.
const WORKER_EXTRAS = ["seed", "cfg_scale", "diffusion_steps", "max_new_tokens"];
// Sent only on streamed jobs (the worker refuses it otherwise): milliseconds of audio per stream item.
const STREAM_EXTRAS = ["stream_chunk_ms"];

export async function createSpeech(request, env, ctx, config) {
  const body = await readJsonObject(request, config.MAX_REQUEST_BYTES);
  const speech = parseSpeechRequest(body);
  const timestamps = wantsTimestamps(body);
  RunPod.requireConfigured(config);
  const runpod = new RunPod(config, ctx);
  const voice = await resolveVoices(new VoiceStore(env.VOICES, config), speech);
  const format = FORMATS[speech.responseFormat];

  const jobInput = {
    text: speech.input,
    ...voice,
    output_format: format.worker,
    ...(format.sampleRate ? { sample_rate: format.sampleRate } : {}),
    ...(speech.speed !== undefined ? { speed: speech.speed } : {}),
    ...speech.extras,
    return: "auto",
  };
  const headers = { "content-type": format.contentType, "cache-control": "no-store" };
  // VibeVoice has no instruction input: the text is spoken as written, and the reply says so.
  if (speech.instructions !== undefined) headers["x-vibevoice-ignored"] = "instructions";
  if (timestamps) return timedSpeech(runpod, jobInput, format, speech.responseFormat, headers);
  const usage = { characters: [...speech.input].length };

  const streaming =
    format.streams &&
    (speech.streamFormat === "sse" ||
      speech.streamFormat === "audio" ||
      (speech.streamFormat === undefined && config.streamAudio));
  if (!streaming) {
    const deadline = runpod.deadline();
    const job = await runpod.runToCompletion(jobInput, deadline);
    const { bytes, result } = await runpod.fetchAudio(job.output, deadline);
    checkFormat(result, format);
    headers["x-runpod-job-id"] = job.id;
    if (speech.streamFormat === "sse") {
      return sseResponse(single({ bytes, base64: null }), { ...result }, usage, headers, ctx, runpod, job.id);
    }
    return new Response(bytes, { headers: { ...headers, "content-length": String(bytes.byteLength) } });
  }

  const deadline = runpod.deadline();
  const id = await runpod.submit({ ...jobInput, ...speech.streamExtras, stream: true }, deadline);
  headers["x-runpod-job-id"] = id;
  const summary = {};
  const pieces = audioPieces(runpod, runpod.streamItems(id, deadline), format, deadline, summary);
  let first;
  try {
    first = await pieces.next();
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 400) runpod.cancel(id);
    throw error;
  }
  if (first.done)
    throw new ApiError(502, "The worker finished without sending audio.", { code: "upstream_bad_output" });
  const rest = prepend(first.value, pieces);
  if (speech.streamFormat === "sse") return sseResponse(rest, summary, usage, headers, ctx, runpod, id);
  return rawResponse(rest, headers, ctx, runpod, id);
}

export function parseSpeechRequest(body) {
  const { model, input, voice, instructions, response_format, speed, stream_format } = body;
  if (model === undefined || model === null || model === "") throw invalid("'model' is required.", "model");
  if (typeof model !== "string") throw invalid("'model' must be a string.", "model");
  if (!MODELS.includes(model)) {
    throw invalid(
      `Model '${model.slice(0, 100)}' does not exist; use one of: ${MODELS.join(", ")}.`,
      "model",
      "model_not_found",
    );
  }
  if (input === undefined || input === null) throw invalid("'input' is required: give the text to speak.", "input");
  if (typeof input !== "string") throw invalid("'input' must be a string.", "input");
  if (!input.trim()) throw invalid("'input' is empty; give the text to speak.", "input");
  const length = [...input].length;
  if (length > INPUT_MAX) {
    throw invalid(
      `'input' is ${length} characters long; the limit is ${INPUT_MAX}.`,
      "input",
      "string_above_max_length",
    );
  }
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
  for (const name of WORKER_EXTRAS) if (body[name] !== undefined && body[name] !== null) extras[name] = body[name];
  const streamExtras = {};
  for (const name of STREAM_EXTRAS) {
    if (body[name] !== undefined && body[name] !== null) streamExtras[name] = body[name];
  }
  return {
    model,
    input,
    voice: parsedVoice,
    speakers,
    instructions: instructions ?? undefined,
    responseFormat,
    speed: speed ?? undefined,
    streamFormat,
    extras,
    streamExtras,
  };
}

// The audio of a streaming job as {bytes, base64} pieces, in order; fills `summary` from the
// worker's last ("complete") item.
async function* audioPieces(runpod, items, format, deadline, summary) {
  let lastSeq = -Infinity;
  for await (const item of items) {
    if (!item || typeof item !== "object") continue;
    if (item.status === "complete" || item.status === "completed") {
      Object.assign(summary, item);
    }
    if (typeof item.audio_chunk === "string") {
      if (typeof item.seq === "number") {
        if (item.seq <= lastSeq) continue; // a repeated delivery
        lastSeq = item.seq;
      }
      checkFormat(item, format);
      const bytes = fromBase64(item.audio_chunk);
      if (!bytes)
        throw new ApiError(502, "The worker sent an audio chunk that is not base64.", { code: "upstream_bad_output" });
      if (bytes.byteLength) yield { bytes, base64: item.audio_chunk };
    } else if (item.audio_url || item.audio_base64) {
      // A whole file in the stream (a worker that does not stream this job).
      const { bytes, result } = await runpod.fetchAudio([item], deadline);
      checkFormat(result, format);
      Object.assign(summary, result);
      yield { bytes, base64: null };
    }
  }
}

function checkFormat(item, format) {
  if (item.format && item.format !== format.worker) {
    throw new ApiError(502, `The worker sent ${item.format} audio instead of ${format.worker}.`, {
      code: "upstream_bad_output",
    });
  }
}

function rawResponse(pieces, headers, ctx, runpod, id) {
  const { readable, writable } = new TransformStream();
  const writer = writable.getWriter();
  const pump = (async () => {
    try {
      for await (const piece of pieces) await writer.write(piece.bytes);
      await writer.close();
    } catch (error) {
      // The client went away, or the job failed after audio was sent: stop the job, break the stream.
      runpod.cancel(id);
      console.warn(`bridge: stream of job ${id} ended early (${error?.code || error?.name || "error"})`);
      await writer.abort(error).catch(() => {});
    }
  })();
  ctx?.waitUntil?.(pump);
  return new Response(readable, { headers });
}

function sseResponse(pieces, summary, usage, headers, ctx, runpod, id) {
  const { readable, writable } = new TransformStream();
  const writer = writable.getWriter();
  const encoder = new TextEncoder();
  const send = (event) => writer.write(encoder.encode(`data: ${JSON.stringify(event)}\n\n`));
  const pump = (async () => {
    try {
      for await (const piece of pieces) {
        await send({ type: "speech.audio.delta", audio: piece.base64 ?? toBase64(piece.bytes) });
      }
      const outputTokens = Math.ceil((Number(summary.duration_sec) || 0) * FRAMES_PER_SECOND - 1e-6);
      await send({
        type: "speech.audio.done",
        usage: {
          input_tokens: usage.characters,
          output_tokens: outputTokens,
          total_tokens: usage.characters + outputTokens,
        },
      });
      await writer.close();
    } catch (error) {
      runpod.cancel(id);
      console.warn(`bridge: event stream of job ${id} ended early (${error?.code || error?.name || "error"})`);
      const apiError =
        error instanceof ApiError ? error : new ApiError(502, "The stream failed.", { code: "stream_failed" });
      try {
        await send({ type: "error", error: apiError.toJSON().error });
        await writer.close();
      } catch {
        await writer.abort(error).catch(() => {});
      }
    }
  })();
  ctx?.waitUntil?.(pump);
  return new Response(readable, {
    headers: { ...headers, "content-type": "text/event-stream", "cache-control": "no-cache" },
  });
}

async function* single(piece) {
  yield piece;
}

async function* prepend(first, rest) {
  yield first;
  yield* rest;
}

function shown(value) {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 40 ? text.slice(0, 37) + "..." : text;
}
