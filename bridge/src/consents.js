// OpenAI's voice consent recordings: /v1/audio/voice_consents (the SDKs' audio.voice_consents).
//
//   consents/cons_<owner tag><hex>   the recording (up to 10 MiB); name, language, date and owner in metadata
//   consent-bindings/cons_<...>      the id of the voice the recording was given for, written once
//
// A consent is the speaker's recorded permission to clone their voice. It belongs to the key that
// uploaded it (keys.js), is used for one voice only (voices.js binds it), cannot be deleted while
// that voice exists unless both go together (`?delete_voice=true`), and a voice whose consent is
// gone can no longer be used. With REQUIRE_VOICE_CONSENT every new voice needs one. The
// recordings are kept, never sent to RunPod.

import { ApiError, invalid, notFound } from "./errors.js";
import { json } from "./http.js";
import { ownerTag, owns } from "./keys.js";
import { checkClip, readUpload } from "./uploads.js";

export const CONSENT_PREFIX = "consents/";
export const BINDING_PREFIX = "consent-bindings/";
const CONSENT_ID = /^cons_[0-9a-f]{24}$/;
const NAME_MAX = 256;
// BCP 47, loosely: "en", "en-US", "zh-Hant-TW".
const LANGUAGE = /^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8}){0,4}$/;
const PAGE_LIMIT = 100;

export class ConsentStore {
  // `caller`: {owner, admin} (keys.js); every read and write is scoped to it.
  constructor(bucket, config, caller) {
    this.bucket = bucket;
    this.config = config;
    this.caller = caller;
  }

  // The caller's recording `id` as an R2 object (with body when `withBody`), or null: another
  // owner's recording does not exist for this caller.
  async object(id, { withBody = false } = {}) {
    if (!this.bucket || typeof id !== "string" || !CONSENT_ID.test(id)) return null;
    const object = withBody ? await this.bucket.get(CONSENT_PREFIX + id) : await this.bucket.head(CONSENT_PREFIX + id);
    return object && owns(this.caller, object.customMetadata?.owner) ? object : null;
  }

  async get(id) {
    const object = await this.object(id);
    if (!object) return null;
    const voice = await this.voiceOf(id);
    return { ...describe(id, object, this.caller), ...(voice ? { voice_id: voice } : {}) };
  }

  async create({ name, language, recording }) {
    const cleanName = checkName(name);
    const cleanLanguage = checkLanguage(language);
    const kind = checkClip(recording, this.config.MAX_VOICE_BYTES, "recording");
    const tag = await ownerTag(this.caller.owner);
    await checkQuota(this.bucket, CONSENT_PREFIX + "cons_" + tag, this.caller, this.config.MAX_CONSENTS_PER_OWNER, {
      what: "consent recordings",
      setting: "MAX_CONSENTS_PER_OWNER",
    });
    const id = "cons_" + tag + randomHex(8);
    const createdAt = Math.floor(Date.now() / 1000);
    const customMetadata = {
      name: cleanName,
      language: cleanLanguage,
      created_at: String(createdAt),
      owner: this.caller.owner,
    };
    await this.bucket.put(CONSENT_PREFIX + id, recording, {
      httpMetadata: { contentType: kind.contentType },
      customMetadata,
    });
    return describe(id, { customMetadata }, this.caller);
  }

  // R2 has no metadata-only update: the recording is written again with the new name.
  async rename(id, name) {
    const cleanName = checkName(name);
    const object = await this.object(id, { withBody: true });
    if (!object) throw consentNotFound(id);
    const customMetadata = { ...object.customMetadata, name: cleanName };
    await this.bucket.put(CONSENT_PREFIX + id, await object.arrayBuffer(), {
      httpMetadata: object.httpMetadata,
      customMetadata,
    });
    return describe(id, { customMetadata, uploaded: object.uploaded }, this.caller);
  }

  // The id of the voice the recording was given for, or null while it is unused.
  async voiceOf(id) {
    const binding = await this.bucket.get(BINDING_PREFIX + id);
    return binding ? binding.text() : null;
  }

  // Gives an unused recording to `voiceId`, once: the binding is written only if none exists (R2's
  // If-None-Match: *), so of two voices made with one recording at the same moment one gets it.
  async bind(id, voiceId) {
    return Boolean(await this.bucket.put(BINDING_PREFIX + id, voiceId, { onlyIf: { etagDoesNotMatch: "*" } }));
  }

  // Refused while the voice given with it exists, unless `deleteVoice` (then both go).
  async delete(id, { deleteVoice = false } = {}) {
    if (!(await this.object(id))) throw consentNotFound(id);
    const voice = await this.voiceOf(id);
    const voiceKey = voice ? `clips/${voice}` : null;
    if (voiceKey && (await this.bucket.head(voiceKey))) {
      if (!deleteVoice) {
        throw new ApiError(
          409,
          `Consent recording '${id}' is the consent of voice '${voice}'; delete the voice first, or send delete_voice=true to delete both.`,
          { param: "consent_id", code: "consent_in_use" },
        );
      }
      await this.bucket.delete(voiceKey);
    }
    await this.bucket.delete([CONSENT_PREFIX + id, BINDING_PREFIX + id]);
    const deleted = { id, object: "audio.voice_consent", deleted: true };
    return voiceKey && deleteVoice ? { ...deleted, deleted_voice: voice } : deleted;
  }

  // OpenAI's cursor page in id order: {object, data, first_id, last_id, has_more}. One R2 list
  // call of the caller's own keys (an admin's: everyone's), whatever the bucket holds.
  async list({ after, limit }) {
    const prefix = CONSENT_PREFIX + "cons_" + (this.caller.admin ? "" : await ownerTag(this.caller.owner));
    const listing = await this.bucket.list({
      prefix,
      limit,
      include: ["customMetadata"],
      ...(after ? { startAfter: CONSENT_PREFIX + after } : {}),
    });
    const data = [];
    for (const object of listing.objects) {
      const id = object.key.slice(CONSENT_PREFIX.length);
      if (CONSENT_ID.test(id) && owns(this.caller, object.customMetadata?.owner)) {
        data.push(describe(id, object, this.caller));
      }
    }
    const lastKey = listing.objects.at(-1)?.key;
    return {
      object: "list",
      data,
      first_id: data[0]?.id ?? null,
      last_id: lastKey ? lastKey.slice(CONSENT_PREFIX.length) : null,
      has_more: listing.truncated,
    };
  }
}

// Refuses a new object when the caller's keys under `prefix` already number `max` (one R2 list).
export async function checkQuota(bucket, prefix, caller, max, { what, setting }) {
  const listing = await bucket.list({ prefix, limit: Math.min(max + 1, 1000), include: ["customMetadata"] });
  const mine = listing.objects.filter((object) => object.customMetadata?.owner === caller.owner).length;
  if (mine >= max) {
    throw new ApiError(429, `This key already keeps ${mine} ${what}, the most ${setting} allows; delete one first.`, {
      type: "insufficient_quota",
      code: "quota_exceeded",
    });
  }
}

// --- routes -------------------------------------------------------------------------------------

export async function createConsent(request, env, config, caller) {
  const store = consentStore(env, config, caller);
  const fields = await readUpload(request, config, "recording", ["name", "language"]);
  return json(await store.create(fields));
}

export async function listConsents(request, env, config, caller) {
  const params = new URL(request.url).searchParams;
  const limit = params.has("limit") ? Number(params.get("limit")) : 20;
  if (!Number.isInteger(limit) || limit < 1 || limit > PAGE_LIMIT) {
    throw invalid(`'limit' must be an integer from 1 to ${PAGE_LIMIT}.`, "limit");
  }
  const after = params.get("after") || undefined;
  if (after !== undefined && !CONSENT_ID.test(after)) {
    throw invalid("'after' must be a consent recording id (the last_id of the page before).", "after");
  }
  return json(await consentStore(env, config, caller).list({ after, limit }));
}

export async function getConsent(env, config, caller, id) {
  const consent = await consentStore(env, config, caller).get(id);
  if (!consent) throw consentNotFound(id);
  return json(consent);
}

export async function updateConsent(request, env, config, caller, id) {
  const fields = await readUpload(request, config, null, ["name"]);
  return json(await consentStore(env, config, caller).rename(id, fields.name));
}

export async function deleteConsent(request, env, config, caller, id) {
  const value = new URL(request.url).searchParams.get("delete_voice");
  if (value !== null && value !== "true" && value !== "false") {
    throw invalid("'delete_voice' must be true or false.", "delete_voice");
  }
  return json(await consentStore(env, config, caller).delete(id, { deleteVoice: value === "true" }));
}

function consentStore(env, config, caller) {
  if (!env.VOICES) throw new ApiError(503, "The bridge has no R2 bucket bound as VOICES.", { code: "not_configured" });
  return new ConsentStore(env.VOICES, config, caller);
}

function describe(id, object, caller) {
  const meta = object.customMetadata || {};
  return {
    id,
    object: "audio.voice_consent",
    name: meta.name || id,
    language: meta.language || "",
    created_at: Number(meta.created_at) || Math.floor(new Date(object.uploaded).getTime() / 1000) || 0,
    ...(caller?.admin ? { owner: meta.owner ?? null } : {}),
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

export function consentNotFound(id, param = "consent_id") {
  return notFound(`No consent recording with id '${String(id).slice(0, 100)}'.`, param, "consent_not_found");
}

export function randomHex(bytes) {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}
