// Voices kept in the R2 bucket bound as VOICES.
//
//   voices.json          the operator's map: voice id -> worker preset, stored clip or clip URL
//   clips/voice_<hex>    clips created through POST /v1/audio/voices (name and date in metadata)
//
// voices.json is read through a short in-memory cache (VOICES_CACHE_SECONDS). Created voices are
// looked up directly by id, so a new voice works in the very next request, on any isolate.
// Clips reach the worker as signed URLs to the bridge (clips.js). PRESET_VOICES, when set, names
// the endpoint's presets: they are listed, and other preset names are refused before a job starts.

import { clipUrl } from "./clips.js";
import { ConsentStore, randomHex } from "./consents.js";
import { ApiError, invalid, notFound } from "./errors.js";
import { formatBytes } from "./http.js";
import { withOpenAiVoices } from "./openai_voices.js";
import { checkClip } from "./uploads.js";

export const CLIP_PREFIX = "clips/";
const VOICE_ID = /^voice_[0-9a-f]{24}$/;
const NAME_MAX = 64;

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

  // The operator's map, then OpenAI's voice names it leaves out (openai_voices.js):
  // {id: {name, preset | clip | url}} in that order.
  async map({ fresh = false } = {}) {
    const offered = (preset) => !this.config.presetVoices.length || findPreset(this.config.presetVoices, preset);
    return withOpenAiVoices(await this.fileMap({ fresh }), this.config, offered);
  }

  // voices.json, validated, in file order (cached for VOICES_CACHE_SECONDS).
  async fileMap({ fresh = false } = {}) {
    if (!this.bucket) return new Map();
    const cached = mapCache.get(this.bucket);
    if (!fresh && cached && cached.expires > Date.now()) return cached.voices;
    const object = await this.bucket.get(this.config.voicesKey);
    const voices = object ? parseVoicesJson(await object.text(), this.config.voicesKey) : new Map();
    mapCache.set(this.bucket, { voices, expires: Date.now() + this.config.VOICES_CACHE_SECONDS * 1000 });
    return voices;
  }

  // The voices of voices.json, then the endpoint's presets, then (unless `presetsOnly`, the public
  // listing) the created voices. Ids and names only: no clip keys or URLs.
  async list({ presetsOnly = false } = {}) {
    const voices = [];
    for (const [id, entry] of await this.map()) {
      voices.push({ id, name: entry.name, object: "audio.voice", type: entry.preset ? "preset" : "audio_sample" });
    }
    const seen = new Set(voices.map((voice) => voice.id.toLowerCase()));
    for (const name of this.config.presetVoices) {
      if (!seen.has(name.toLowerCase())) voices.push({ id: name, name, object: "audio.voice", type: "preset" });
    }
    if (!presetsOnly) for (const clip of await this.createdVoices()) voices.push(clip);
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

  // What the worker needs for an OpenAI `voice`: {speaker} or {voice_url}. `request` gives the
  // origin that signed clip URLs point at.
  async resolve(voice, request) {
    const byObject = typeof voice === "object";
    const id = byObject ? voice.id : voice;
    if (VOICE_ID.test(id)) return { voice_url: await this.clipLink(CLIP_PREFIX + id, id, request) };

    let voices = await this.map();
    let entry = lookup(voices, id);
    if (!entry && byObject) entry = lookup((voices = await this.map({ fresh: true })), id);
    if (entry) {
      if (entry.preset) return { speaker: this.checkPreset(entry.preset) };
      if (entry.url) return { voice_url: entry.url };
      return { voice_url: await this.clipLink(entry.clip, id, request) };
    }
    if (byObject) throw voiceNotFound(id);
    // Any other name goes to the worker as a preset name.
    return { speaker: this.checkPreset(id) };
  }

  // With PRESET_VOICES set, a name the endpoint does not have is refused here, as the worker
  // would refuse it (file stem or VibeVoice short name, any case), before a GPU job is queued.
  checkPreset(name) {
    const presets = this.config.presetVoices;
    if (!presets.length || findPreset(presets, name)) return name;
    throw invalid(
      `'voice': unknown voice '${String(name).slice(0, 100)}'; available voices: ${presets.join(", ")}.`,
      "voice",
      "voice_not_found",
    );
  }

  // A signed URL for a clip in the bucket, valid as long as the job may live.
  async clipLink(key, id, request) {
    if (!this.bucket) throw voiceNotFound(id);
    const object = await this.bucket.head(key);
    if (!object) throw voiceNotFound(id);
    if (object.size > this.config.MAX_VOICE_BYTES) {
      const size = formatBytes(object.size);
      const limit = formatBytes(this.config.MAX_VOICE_BYTES);
      throw invalid(
        `The clip of voice '${id}' is ${size}, over the ${limit} limit for reference audio.`,
        "voice",
        "voice_too_large",
      );
    }
    const seconds = this.config.JOB_TIMEOUT_SECONDS + this.config.TTL_MARGIN_SECONDS;
    return clipUrl(key, request, this.config, seconds);
  }

  async create({ name, audio, consent }) {
    this.requireBucket();
    const cleanName = checkName(name);
    const kind = checkClip(audio, this.config.MAX_VOICE_BYTES, "audio_sample");
    await this.checkConsent(consent);
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

  // With REQUIRE_VOICE_CONSENT, a voice needs the id of a stored consent recording; otherwise a
  // given `consent` is kept as it is, as metadata.
  async checkConsent(consent) {
    if (consent !== undefined && (typeof consent !== "string" || consent.length > 100)) {
      throw invalid("'consent' must be a consent recording id of at most 100 characters.", "consent");
    }
    if (!this.config.REQUIRE_VOICE_CONSENT) return;
    if (!consent) {
      throw invalid(
        "'consent' is required: upload a consent recording to /v1/audio/voice_consents and give its id.",
        "consent",
      );
    }
    if (!(await new ConsentStore(this.bucket, this.config).get(consent))) {
      throw notFound(`No consent recording with id '${consent.slice(0, 100)}'.`, "consent", "consent_not_found");
    }
  }

  async delete(id) {
    this.requireBucket();
    if (VOICE_ID.test(id)) {
      if (!(await this.bucket.head(CLIP_PREFIX + id))) throw voiceNotFound(id);
      await this.bucket.delete(CLIP_PREFIX + id);
      return { id, object: "audio.voice.deleted", deleted: true };
    }
    const entry = lookup(await this.map({ fresh: true }), id);
    if (entry?.builtIn) {
      throw invalid(
        `Voice '${id}' is one of OpenAI's voice names, which the bridge maps to a preset; map it to another voice in ${this.config.voicesKey} instead.`,
        "voice_id",
        "voice_not_deletable",
      );
    }
    if (entry) {
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
  return "voice_" + randomHex(12);
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

// The preset `name` matches: a file stem, or the short name of exactly one VibeVoice-style file
// ("Alice" for en-Alice_woman), case-insensitively; as the worker's voices.VoiceLibrary.find.
export function findPreset(presets, name) {
  const wanted = String(name).trim().toLowerCase();
  const exact = presets.find((preset) => preset.toLowerCase() === wanted);
  if (exact) return exact;
  const short = presets.filter((preset) => /^[a-z]{2,3}-([^_]+)_/i.exec(preset)?.[1].toLowerCase() === wanted);
  return short.length === 1 ? short[0] : null;
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
