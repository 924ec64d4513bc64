// Voices kept in the R2 bucket bound as VOICES.
//
//   voices.json          the operator's map: voice id -> worker preset, stored clip or clip URL
//   clips/voice_<hex>    clips created through POST /v1/audio/voices (name and date in metadata)
//
// voices.json is read through a short in-memory cache (VOICES_CACHE_SECONDS). Created voices are
// looked up directly by id, so a new voice works in the very next request, on any isolate.

import { ApiError, invalid, notFound } from "./errors.js";
import { formatBytes, toBase64 } from "./http.js";

export const CLIP_PREFIX = "clips/";
const VOICE_ID = /^voice_[0-9a-f]{24}$/;
const NAME_MAX = 64;

// Clip containers the worker decodes, recognised by their first bytes.
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

// One cache per isolate; keyed by bucket so tests with separate buckets do not share it.
const mapCache = new WeakMap();

export class VoiceStore {
  constructor(bucket, config) {
    this.bucket = bucket;
    this.config = config;
  }

  requireBucket() {
    if (!this.bucket) {
      throw new ApiError(503, "The bridge has no R2 bucket bound as VOICES.", { code: "not_configured" });
    }
  }

  // The operator's map, validated: {id: {name, preset | clip | url}} in file order.
  async map({ fresh = false } = {}) {
    if (!this.bucket) return new Map();
    const cached = mapCache.get(this.bucket);
    if (!fresh && cached && cached.expires > Date.now()) return cached.voices;
    const object = await this.bucket.get(this.config.voicesKey);
    const voices = object ? parseVoicesJson(await object.text(), this.config.voicesKey) : new Map();
    mapCache.set(this.bucket, { voices, expires: Date.now() + this.config.VOICES_CACHE_SECONDS * 1000 });
    return voices;
  }

  async list() {
    const voices = [];
    for (const [id, entry] of await this.map()) {
      voices.push({ id, name: entry.name, object: "audio.voice", type: entry.preset ? "preset" : "audio_sample" });
    }
    for (const clip of await this.createdVoices()) voices.push(clip);
    return voices;
  }

  async createdVoices() {
    if (!this.bucket) return [];
    const found = [];
    let cursor;
    // Bounded: 50 pages of 1000 voices.
    for (let page = 0; page < 50; page++) {
      const listing = await this.bucket.list({ prefix: CLIP_PREFIX + "voice_", cursor, include: ["customMetadata"] });
      for (const object of listing.objects) {
        const id = object.key.slice(CLIP_PREFIX.length);
        if (VOICE_ID.test(id)) found.push(describeCreated(id, object));
      }
      if (!listing.truncated) break;
      cursor = listing.cursor;
    }
    return found.sort((a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id));
  }

  async getCreated(id) {
    if (!this.bucket || !VOICE_ID.test(id)) return null;
    const object = await this.bucket.head(CLIP_PREFIX + id);
    return object ? describeCreated(id, object) : null;
  }

  // What the worker needs for an OpenAI `voice`: {speaker} | {voice_audio_base64} | {voice_url}.
  async resolve(voice) {
    const byObject = typeof voice === "object";
    const id = byObject ? voice.id : voice;
    if (VOICE_ID.test(id)) return { voice_audio_base64: await this.clipBase64(CLIP_PREFIX + id, id) };

    let voices = await this.map();
    let entry = lookup(voices, id);
    if (!entry && byObject) entry = lookup((voices = await this.map({ fresh: true })), id);
    if (entry) {
      if (entry.preset) return { speaker: entry.preset };
      if (entry.url) return { voice_url: entry.url };
      return { voice_audio_base64: await this.clipBase64(entry.clip, id) };
    }
    if (byObject) throw voiceNotFound(id);
    // Any other name goes to the worker as a preset name; the worker lists its presets when it
    // does not know the name.
    return { speaker: id };
  }

  async clipBase64(key, id) {
    if (!this.bucket) throw voiceNotFound(id);
    const object = await this.bucket.get(key);
    if (!object) throw voiceNotFound(id);
    const bytes = new Uint8Array(await object.arrayBuffer());
    if (bytes.byteLength > this.config.MAX_VOICE_BYTES) {
      const size = formatBytes(bytes.byteLength);
      const limit = formatBytes(this.config.MAX_VOICE_BYTES);
      throw invalid(
        `The clip of voice '${id}' is ${size}, over the ${limit} limit for reference audio.`,
        "voice",
        "voice_too_large",
      );
    }
    return toBase64(bytes);
  }

  async create({ name, audio, consent }) {
    this.requireBucket();
    const cleanName = checkName(name);
    const kind = checkClip(audio, this.config.MAX_VOICE_BYTES);
    const id = newVoiceId();
    const createdAt = Math.floor(Date.now() / 1000);
    await this.bucket.put(CLIP_PREFIX + id, audio, {
      httpMetadata: { contentType: kind.contentType },
      customMetadata: {
        name: cleanName,
        created_at: String(createdAt),
        format: kind.kind,
        ...(consent ? { consent } : {}),
      },
    });
    return { id, object: "audio.voice", name: cleanName, created_at: createdAt, type: "audio_sample" };
  }

  async delete(id) {
    this.requireBucket();
    if (VOICE_ID.test(id)) {
      if (!(await this.bucket.head(CLIP_PREFIX + id))) throw voiceNotFound(id);
      await this.bucket.delete(CLIP_PREFIX + id);
      return { id, object: "audio.voice.deleted", deleted: true };
    }
    if (lookup(await this.map({ fresh: true }), id)) {
      throw invalid(
        `Voice '${id}' is defined in ${this.config.voicesKey}; edit that file in the bucket to remove it.`,
        "voice_id",
        "voice_not_deletable",
      );
    }
    throw voiceNotFound(id);
  }
}

function describeCreated(id, object) {
  const meta = object.customMetadata || {};
  return {
    id,
    object: "audio.voice",
    name: meta.name || id,
    type: "audio_sample",
    created_at: Number(meta.created_at) || Math.floor(new Date(object.uploaded).getTime() / 1000) || 0,
  };
}

function lookup(voices, id) {
  if (voices.has(id)) return voices.get(id);
  const wanted = id.toLowerCase();
  for (const [key, entry] of voices) if (key.toLowerCase() === wanted) return entry;
  return null;
}

function voiceNotFound(id) {
  return notFound(`No voice with id '${String(id).slice(0, 100)}'.`, "voice", "voice_not_found");
}

// 96 random bits: unguessable, and stable once created.
function newVoiceId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "voice_" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function checkName(name) {
  if (typeof name !== "string" || !name.trim()) throw invalid("'name' is required: give the voice a name.", "name");
  const clean = name.trim();
  if (clean.length > NAME_MAX)
    throw invalid(`'name' is ${clean.length} characters long; the limit is ${NAME_MAX}.`, "name");
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(clean)) throw invalid("'name' contains a control character.", "name");
  return clean;
}

function checkClip(audio, limit) {
  if (!(audio instanceof Uint8Array) || audio.byteLength === 0) {
    throw invalid("'audio_sample' is required: send the reference audio file.", "audio_sample");
  }
  if (audio.byteLength > limit) {
    throw new ApiError(
      413,
      `'audio_sample' is ${formatBytes(audio.byteLength)}, over the ${formatBytes(limit)} limit.`,
      {
        param: "audio_sample",
        code: "voice_too_large",
      },
    );
  }
  const kind = CLIP_KINDS.find(({ test }) => test(audio));
  if (!kind) {
    throw invalid(
      "'audio_sample' must be WAV, MP3, FLAC, Ogg (Opus or Vorbis), M4A/AAC or WebM audio.",
      "audio_sample",
    );
  }
  return kind;
}

// voices.json: {"voices": {"alloy": "Alice" | {"preset"|"clip"|"url": ..., "name"?: ...}}}
export function parseVoicesJson(text, key = "voices.json") {
  const broken = (why) =>
    new ApiError(500, `${key} in the voices bucket is not valid: ${why}`, { code: "bad_voices_config" });
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw broken("it is not JSON.");
  }
  const table = data && typeof data === "object" && !Array.isArray(data) ? data.voices : undefined;
  if (!table || typeof table !== "object" || Array.isArray(table)) {
    throw broken('it needs an object "voices" mapping voice ids to voices.');
  }
  const voices = new Map();
  for (const [id, value] of Object.entries(table)) {
    const entry = typeof value === "string" ? { preset: value } : value;
    if (!entry || typeof entry !== "object" || Array.isArray(entry))
      throw broken(`voice '${id}' must be a string or an object.`);
    const sources = ["preset", "clip", "url"].filter((field) => typeof entry[field] === "string" && entry[field]);
    if (sources.length !== 1) throw broken(`voice '${id}' needs exactly one of "preset", "clip" or "url".`);
    if (entry.url && !/^https?:\/\//i.test(entry.url)) throw broken(`voice '${id}' has a "url" that is not http(s).`);
    const name = typeof entry.name === "string" && entry.name ? entry.name : id;
    voices.set(id, { name, [sources[0]]: entry[sources[0]] });
  }
  return voices;
}

function ascii(bytes, start, end) {
  return String.fromCharCode(...bytes.subarray(start, end));
}
