// Uploaded audio files (a voice's `audio_sample`, a consent's `recording`), read from
// multipart/form-data as the OpenAI SDKs send them, or from JSON with base64 audio; and the
// containers the worker decodes, recognised by their first bytes.

import { ApiError, invalid } from "./errors.js";
import { formatBytes, fromBase64, readBody } from "./http.js";

// Multipart and base64 overhead on top of the file itself.
const FORM_OVERHEAD = 64 * 1024;
// Other names clients give the file part (JSON bodies: the same names, base64 or a data: URL).
const FILE_ALIASES = ["file", "audio", "audio_base64"];

const CLIP_KINDS = [
  { kind: "wav", contentType: "audio/wav", test: (b) => ascii(b, 0, 4) === "RIFF" && ascii(b, 8, 12) === "WAVE" },
  { kind: "flac", contentType: "audio/flac", test: (b) => ascii(b, 0, 4) === "fLaC" },
  { kind: "ogg", contentType: "audio/ogg", test: (b) => ascii(b, 0, 4) === "OggS" },
  {
    kind: "mp3",
    contentType: "audio/mpeg",
    test: (b) => ascii(b, 0, 3) === "ID3" || (b[0] === 0xff && (b[1] & 0xe6) === 0xe2),
  },
  { kind: "m4a", contentType: "audio/mp4", test: (b) => ascii(b, 4, 8) === "ftyp" },
  { kind: "aac", contentType: "audio/aac", test: (b) => b[0] === 0xff && (b[1] & 0xf6) === 0xf0 },
  {
    kind: "webm",
    contentType: "audio/webm",
    test: (b) => b[0] === 0x1a && b[1] === 0x45 && b[2] === 0xdf && b[3] === 0xa3,
  },
];

// The text fields `names` and, when `fileField` is given, the file's bytes under that name.
export async function readUpload(request, config, fileField, names) {
  const type = (request.headers.get("content-type") || "").toLowerCase();
  if (type.startsWith("multipart/form-data")) return multipartFields(request, config, fileField, names);
  if (type.startsWith("application/json")) return jsonFields(request, config, fileField, names);
  const how = fileField
    ? `multipart/form-data (${[...names, fileField].join(", ")}) or as JSON with base64 audio`
    : "JSON";
  throw invalid(`Send the request body as ${how}.`, null, "unsupported_content_type");
}

async function multipartFields(request, config, fileField, names) {
  const bytes = await readBody(request, config.MAX_VOICE_BYTES + FORM_OVERHEAD);
  let form;
  try {
    form = await new Response(bytes, { headers: { "content-type": request.headers.get("content-type") } }).formData();
  } catch {
    throw invalid("The multipart body could not be read.");
  }
  const fields = Object.fromEntries(names.map((name) => [name, textField(form, name)]));
  if (!fileField) return fields;
  const file = [fileField, ...FILE_ALIASES].map((name) => form.get(name)).find((value) => value !== null);
  if (typeof file === "string") throw invalid(`'${fileField}' must be a file part, not a text field.`, fileField);
  if (file && typeof file.arrayBuffer === "function") fields[fileField] = new Uint8Array(await file.arrayBuffer());
  return fields;
}

async function jsonFields(request, config, fileField, names) {
  const bytes = await readBody(request, Math.ceil((config.MAX_VOICE_BYTES * 4) / 3) + FORM_OVERHEAD);
  let body;
  try {
    body = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw invalid("The request body is not valid JSON.");
  }
  if (!body || typeof body !== "object" || Array.isArray(body)) {
    throw invalid("The request body must be a JSON object.");
  }
  const fields = Object.fromEntries(names.map((name) => [name, body[name] ?? undefined]));
  if (!fileField) return fields;
  const encoded = [fileField, ...FILE_ALIASES].map((name) => body[name]).find((value) => value != null);
  if (encoded !== undefined) {
    if (typeof encoded !== "string") throw invalid(`'${fileField}' must be a base64 string.`, fileField);
    fields[fileField] = fromBase64(encoded.replace(/^data:[^,]*,/, ""));
    if (!fields[fileField]) throw invalid(`'${fileField}' is not valid base64.`, fileField);
  }
  return fields;
}

function textField(form, name) {
  const value = form.get(name);
  return typeof value === "string" ? value : undefined;
}

// An uploaded audio file: present, within `limit`, and in a container the worker decodes.
export function checkClip(audio, limit, field) {
  if (!(audio instanceof Uint8Array) || audio.byteLength === 0) {
    throw invalid(`'${field}' is required: send the audio file.`, field);
  }
  if (audio.byteLength > limit) {
    throw new ApiError(413, `'${field}' is ${formatBytes(audio.byteLength)}, over the ${formatBytes(limit)} limit.`, {
      param: field,
      code: "file_too_large",
    });
  }
  const kind = CLIP_KINDS.find(({ test }) => test(audio));
  if (!kind) throw invalid(`'${field}' must be WAV, MP3, FLAC, Ogg (Opus or Vorbis), M4A/AAC or WebM audio.`, field);
  return kind;
}

function ascii(bytes, start, end) {
  return String.fromCharCode(...bytes.subarray(start, end));
}
