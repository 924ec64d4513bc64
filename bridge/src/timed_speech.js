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
import { toBase64 } from "./http.js";

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
export function timedReply(bytes, result, format, responseFormat, headers) {
  const words = Array.isArray(result.words) ? result.words : [];
  const body = {
    audio: toBase64(bytes),
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
  const { "content-disposition": _file, ...jsonHeaders } = headers; // JSON, not an audio file
  return new Response(JSON.stringify(body), { headers: { ...jsonHeaders, "content-type": "application/json" } });
}
