// API keys and the owners they stand for.
//
//   API_KEYS (secret)     {"alice": "<SHA-256 hex of alice's key>", "bob": ["<hex>", "<hex>"]}: the
//                         keys as digests, one or more per owner (two while a key is rotated)
//   AUTH_TOKEN (secret)   one key in clear: the owner "default" (the single-token setup)
//   ADMIN_OWNERS (var)    owners who see and manage every owner's voices and consents
//   ALLOW_ANONYMOUS (var) requests without a key are served, as the one owner "anonymous"
//
// Without any key and without ALLOW_ANONYMOUS the bridge is closed: every route but the public ones
// answers 503 naming the missing secret. Each owner sees, uses and deletes only its own voices and
// consents (voices.js, consents.js); presets and voices.json stay shared.

import { ConfigError } from "./config.js";
import { ApiError } from "./errors.js";

export const DEFAULT_OWNER = "default";
export const ANONYMOUS_OWNER = "anonymous";
const OWNER_NAME = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
const DIGEST = /^[0-9a-f]{64}$/;
const encoder = new TextEncoder();

// The key settings, checked: {digests: [{owner, digest}], token, admins, anonymous}.
export function loadKeys(env, allowAnonymous) {
  const digests = [];
  const raw = env.API_KEYS;
  if (raw !== undefined && raw !== null && String(raw).trim() !== "") {
    let table;
    try {
      table = JSON.parse(raw);
    } catch {
      table = null;
    }
    if (!table || typeof table !== "object" || Array.isArray(table)) throw badKeys();
    for (const [owner, value] of Object.entries(table)) {
      const list = Array.isArray(value) ? value : [value];
      if (!OWNER_NAME.test(owner) || owner === ANONYMOUS_OWNER || !list.length) throw badKeys();
      for (const digest of list) {
        if (typeof digest !== "string" || !DIGEST.test(digest.toLowerCase())) throw badKeys();
        digests.push({ owner, digest: hexBytes(digest.toLowerCase()) });
      }
    }
  }
  const admins = String(env.ADMIN_OWNERS || "")
    .split(",")
    .map((name) => name.trim())
    .filter(Boolean);
  return { digests, token: env.AUTH_TOKEN || "", admins, anonymous: allowAnonymous };
}

function badKeys() {
  return new ConfigError(
    'The secret API_KEYS must be a JSON object mapping owner names to the SHA-256 hex digest of their key (or a list of digests), e.g. {"alice": "9f86d0..."}.',
  );
}

export function hasKeys(keys) {
  return keys.digests.length > 0 || Boolean(keys.token);
}

// Who is calling: {owner, admin}; null for a listing answered to a caller without a key (public
// listings: presets only). Throws 401 for a missing or wrong key, 503 when the bridge has no key.
export async function authenticate(request, keys, { publicListing = false } = {}) {
  const header = request.headers.get("authorization");
  if (header === null) {
    if (keys.anonymous) return caller(ANONYMOUS_OWNER, keys);
    if (publicListing) return null;
  }
  if (!hasKeys(keys)) {
    if (keys.anonymous) return caller(ANONYMOUS_OWNER, keys); // an open bridge: whatever key a client sends
    throw new ApiError(
      503,
      "The bridge has no API key configured: set the AUTH_TOKEN or API_KEYS secret (or ALLOW_ANONYMOUS=true to serve without keys).",
      { code: "not_configured" },
    );
  }
  const match = /^Bearer\s+(.+)$/i.exec((header || "").trim());
  if (!match) {
    throw new ApiError(401, "Missing bearer token: send the header 'Authorization: Bearer <token>'.", {
      code: "invalid_api_key",
    });
  }
  const owner = await ownerOf(match[1], keys);
  if (!owner) throw new ApiError(401, "Incorrect bearer token.", { code: "invalid_api_key" });
  return caller(owner, keys);
}

function caller(owner, keys) {
  return { owner, admin: keys.admins.includes(owner) };
}

// The owner of `key`, or null. Every configured key is compared, in constant time each (SHA-256
// digests of both sides, timingSafeEqual): neither which key matched nor how much of it leaks.
async function ownerOf(key, keys) {
  const given = await digest(key);
  const candidates = [...keys.digests];
  if (keys.token) candidates.push({ owner: DEFAULT_OWNER, digest: await digest(keys.token) });
  let found = null;
  for (const candidate of candidates) {
    if (crypto.subtle.timingSafeEqual(given, candidate.digest) && found === null) found = candidate.owner;
  }
  return found;
}

async function digest(text) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
}

function hexBytes(hex) {
  return new Uint8Array(hex.match(/../g).map((pair) => parseInt(pair, 16)));
}

// The 8 hex digits that start an owner's voice and consent ids: their objects share a key prefix,
// so an owner's listing reads only its own keys (and quotas count them in one R2 call).
export async function ownerTag(owner) {
  return Array.from((await digest(`vibevoice owner\n${owner}`)).subarray(0, 4), (b) =>
    b.toString(16).padStart(2, "0"),
  ).join("");
}

// Whether `caller` may see an object whose metadata names `owner` (objects from before owners
// existed have none: admins only).
export function owns(caller, owner) {
  return Boolean(caller && (caller.admin || (owner && owner === caller.owner)));
}
