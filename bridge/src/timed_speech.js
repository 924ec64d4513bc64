// The Kokoro-style extra of POST /v1/audio/speech: with "timestamps": true (not an OpenAI field),
// the reply is one JSON object with the audio as base64 and the time of every word, as
// Kokoro-FastAPI's captioned speech gives it:
//
//   {"audio": "<base64>", "audio_format": "mp3", "content_type": "audio/mpeg", "duration_sec": 3.2,
//    "timestamps": [{"word": "Hello,", "start_time": 0.12, "end_time": 0.48, "speaker": "Speaker 1"}, ...]}
//
// The worker aligns the words (its job field "timestamps": "word"); the job runs as a whole file
// (speech.js, tied to its request like every job). Without the field, or with false, nothing here
// runs: the plain OpenAI reply is unchanged.

import { invalid } from "./errors.js";
import { concat, toBase64 } from "./http.js";
import { chunksOf } from "./pieces.js";

// Whether the request asks for timestamps; a value other than a boolean is refused.
export function wantsTimestamps(body) {
  const value = body.timestamps;
  if (value === undefined || value === null || value === false) return false;
  if (value !== true) {
    const shown = (JSON.stringify(value) ?? String(value)).slice(0, 40);
    throw invalid(`'timestamps' must be true or false (got ${shown}).`, "timestamps");
  }
  if (body.stream_format === "sse") {
    throw invalid("'timestamps': true answers one JSON object, so 'stream_format' cannot be 'sse'.", "stream_format");
  }
  return true;
}

// The reply to a finished job that was asked for word timestamps (the job ran as a whole file).
// The audio (`audio`: a byte stream) is encoded into the JSON as it arrives, so the reply is never
// held whole in the Worker's memory, whatever the file's size.
export function timedReply(audio, result, format, responseFormat, headers) {
  const words = Array.isArray(result.words) ? result.words : [];
  const body = {
    audio: "",
    audio_format: responseFormat,
    content_type: format.contentType,
    duration_sec: result.duration_sec ?? null,
    timestamps: words.map((word) => ({
      word: word.word,
      start_time: word.start_sec,
      end_time: word.end_sec,
      speaker: word.speaker,
    })),
  };
  if (Array.isArray(result.warnings) && result.warnings.length) body.warnings = result.warnings;
  // '{"audio":"' + the base64 + the rest of the object: the one string field "audio" comes first.
  const [head, tail] = JSON.stringify(body).split(/(?<=^\{"audio":")(?=")/);
  const { "content-disposition": _file, ...jsonHeaders } = headers; // JSON, not an audio file
  return new Response(textStream([head, base64Pieces(audio), tail]), {
    headers: { ...jsonHeaders, "content-type": "application/json" },
  });
}

// Base64 of a byte stream, piece by piece (each piece a multiple of 3 bytes, the rest carried on).
async function* base64Pieces(stream) {
  let carry = new Uint8Array(0);
  for await (const chunk of chunksOf(stream)) {
    const bytes = concat([carry, chunk]);
    const whole = bytes.byteLength - (bytes.byteLength % 3);
    yield toBase64(bytes.subarray(0, whole));
    carry = bytes.slice(whole);
  }
  yield toBase64(carry);
}

// A byte stream of text parts, each a string or an async iterable of strings; an error in one
// breaks the stream (the client sees an incomplete transfer, never a shorter JSON).
function textStream(parts) {
  const encoder = new TextEncoder();
  async function* texts() {
    for (const part of parts) {
      if (typeof part === "string") yield part;
      else yield* part;
    }
  }
  const iterator = texts();
  return new ReadableStream({
    async pull(controller) {
      const { value, done } = await iterator.next();
      if (done) controller.close();
      else controller.enqueue(encoder.encode(value));
    },
    async cancel() {
      await iterator.return?.();
    },
  });
}
