// OpenAI's voice consent recordings: /v1/audio/voice_consents (the SDKs' audio.voice_consents).
//
//   consents/cons_<hex>   the recording (up to 10 MiB), with name, language and date in metadata
//
// A consent is the speaker's recorded permission to clone their voice; with REQUIRE_VOICE_CONSENT
// a voice can only be created with the id of one (voices.js). The recordings are kept, never sent
// to RunPod.

import { ApiError, invalid, notFound } from "./errors.js";
import { json } from "./http.js";
import { checkClip, readUpload } from "./uploads.js";

export const CONSENT_PREFIX = "consents/";
const CONSENT_ID = /^cons_[0-9a-f]{24}$/;
const NAME_MAX = 256;
// BCP 47, loosely: "en", "en-US", "zh-Hant-TW".
const LANGUAGE = /^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8}){0,4}$/;
const PAGE_LIMIT = 100;

export class ConsentStore {
  constructor(bucket, config) {
    this.bucket = bucket;
    this.config = config;
  }

  async get(id) {
    if (!this.bucket || !CONSENT_ID.test(id)) return null;
    const object = await this.bucket.head(CONSENT_PREFIX + id);
    return object ? describe(id, object) : null;
  }

  async create({ name, language, recording }) {
    const cleanName = checkName(name);
    const cleanLanguage = checkLanguage(language);
    const kind = checkClip(recording, this.config.MAX_VOICE_BYTES, "recording");
    const id = "cons_" + randomHex(12);
    const createdAt = Math.floor(Date.now() / 1000);
    await this.bucket.put(CONSENT_PREFIX + id, recording, {
      httpMetadata: { contentType: kind.contentType },
      customMetadata: { name: cleanName, language: cleanLanguage, created_at: String(createdAt) },
    });
    return { id, object: "audio.voice_consent", name: cleanName, language: cleanLanguage, created_at: createdAt };
  }

  // R2 has no metadata-only update: the recording is written again with the new name.
  async rename(id, name) {
    const object = CONSENT_ID.test(id) ? await this.bucket.get(CONSENT_PREFIX + id) : null;
    if (!object) throw consentNotFound(id);
    const customMetadata = { ...object.customMetadata, name: checkName(name) };
    await this.bucket.put(CONSENT_PREFIX + id, await object.arrayBuffer(), {
      httpMetadata: object.httpMetadata,
      customMetadata,
    });
    return describe(id, { customMetadata, uploaded: object.uploaded });
  }

  async delete(id) {
    if (!(await this.get(id))) throw consentNotFound(id);
    await this.bucket.delete(CONSENT_PREFIX + id);
    return { id, object: "audio.voice_consent", deleted: true };
  }

  // OpenAI's cursor page, oldest first: {object, data, first_id, last_id, has_more}.
  async list({ after, limit }) {
    const all = [];
    let cursor;
    // Bounded: 50 pages of 1000 recordings.
    for (let page = 0; page < 50; page++) {
      const listing = await this.bucket.list({ prefix: CONSENT_PREFIX, cursor, include: ["customMetadata"] });
      for (const object of listing.objects) {
        const id = object.key.slice(CONSENT_PREFIX.length);
        if (CONSENT_ID.test(id)) all.push(describe(id, object));
      }
      if (!listing.truncated) break;
      cursor = listing.cursor;
    }
    all.sort((a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id));
    const start = after ? all.findIndex((consent) => consent.id === after) + 1 : 0;
    const data = all.slice(start, start + limit);
    return {
      object: "list",
      data,
      first_id: data[0]?.id ?? null,
      last_id: data.at(-1)?.id ?? null,
      has_more: start + data.length < all.length,
    };
  }
}

// --- routes -------------------------------------------------------------------------------------

export async function createConsent(request, env, config) {
  const store = consentStore(env, config);
  const fields = await readUpload(request, config, "recording", ["name", "language"]);
  return json(await store.create(fields));
}

export async function listConsents(request, env, config) {
  const params = new URL(request.url).searchParams;
  const limit = params.has("limit") ? Number(params.get("limit")) : 20;
  if (!Number.isInteger(limit) || limit < 1 || limit > PAGE_LIMIT) {
    throw invalid(`'limit' must be an integer from 1 to ${PAGE_LIMIT}.`, "limit");
  }
  return json(await consentStore(env, config).list({ after: params.get("after") || undefined, limit }));
}

export async function getConsent(env, config, id) {
  const consent = await consentStore(env, config).get(id);
  if (!consent) throw consentNotFound(id);
  return json(consent);
}

export async function updateConsent(request, env, config, id) {
  const fields = await readUpload(request, config, null, ["name"]);
  return json(await consentStore(env, config).rename(id, fields.name));
}

export async function deleteConsent(env, config, id) {
  return json(await consentStore(env, config).delete(id));
}

function consentStore(env, config) {
  if (!env.VOICES) throw new ApiError(503, "The bridge has no R2 bucket bound as VOICES.", { code: "not_configured" });
  return new ConsentStore(env.VOICES, config);
}

function describe(id, object) {
  const meta = object.customMetadata || {};
  return {
    id,
    object: "audio.voice_consent",
    name: meta.name || id,
    language: meta.language || "",
    created_at: Number(meta.created_at) || Math.floor(new Date(object.uploaded).getTime() / 1000) || 0,
  };
}

function checkName(name) {
  if (typeof name !== "string" || !name.trim()) throw invalid("'name' is required: label the recording.", "name");
  const clean = name.trim();
  if (clean.length > NAME_MAX) {
    throw invalid(`'name' is ${clean.length} characters long; the limit is ${NAME_MAX}.`, "name");
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(clean)) throw invalid("'name' contains a control character.", "name");
  return clean;
}

function checkLanguage(language) {
  if (typeof language !== "string" || !LANGUAGE.test(language.trim())) {
    throw invalid("'language' must be a BCP 47 language tag such as 'en-US'.", "language");
  }
  return language.trim();
}

function consentNotFound(id) {
  return notFound(`No consent recording with id '${String(id).slice(0, 100)}'.`, "consent_id", "consent_not_found");
}

export function randomHex(bytes) {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}
