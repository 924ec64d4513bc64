// Signed, expiring URLs for reference clips in the voices bucket, served by the bridge itself.
//
// A clip (up to 10 MiB) reaches the worker as a `voice_url`, not as base64 inside the job, so it
// does not count against RunPod's 10 MB /run payload. R2 bindings cannot presign URLs (that
// takes the bucket's S3 API with a separate R2 API token, and Miniflare has no S3 endpoint), so
// the bridge signs its own: GET /voice-clips/{key}?expires=<unix s>&signature=<HMAC-SHA256 hex>,
// valid for as long as the job may live (its TTL), the same in production and in local runs.
//
// The signing key is CLIP_URL_SECRET, a secret of its own (not derived from another trust
// domain's key), and the URL's origin is PUBLIC_URL (never a request's Host header): both are
// required the first time a clip is needed. Signed URLs serve objects under clips/ only, never
// voices.json or consent recordings. A signed URL is a credential: it stays out of messages and logs.

import { ApiError } from "./errors.js";

const PATH = "/voice-clips/";
export const CLIP_KEY_PREFIX = "clips/";
const encoder = new TextEncoder();

// The URL the worker downloads `key` from, valid for `seconds`.
export async function clipUrl(key, config, seconds) {
  requireSigning(config);
  const expires = Math.floor(Date.now() / 1000) + Math.ceil(seconds);
  const signature = await sign(config, key, expires);
  return `${config.publicUrl}${PATH}${encodeURIComponent(key)}?expires=${expires}&signature=${signature}`;
}

// Cloned voices need both settings; the first request that needs a clip says which one is missing.
function requireSigning(config) {
  const missing = [
    config.clipUrlSecret ? null : "the CLIP_URL_SECRET secret (the key that signs clip URLs)",
    config.publicUrl ? null : "PUBLIC_URL (the bridge's URL as the RunPod worker reaches it)",
  ].filter(Boolean);
  if (missing.length) {
    throw new ApiError(
      503,
      `Cloned voices need ${missing.join(" and ")}: the worker fetches their clips by signed URL.`,
      {
        code: "not_configured",
      },
    );
  }
}

// GET /voice-clips/{key}: the clip, when the signature is right and not expired.
export async function serveClip(request, env, config, key) {
  if (!config.clipUrlSecret) throw new ApiError(404, "No clip URLs are signed here.", { code: "not_found" });
  const url = new URL(request.url);
  const expires = Number(url.searchParams.get("expires"));
  const given = url.searchParams.get("signature") || "";
  const valid =
    key.startsWith(CLIP_KEY_PREFIX) &&
    Number.isInteger(expires) &&
    /^[0-9a-f]{64}$/.test(given) &&
    crypto.subtle.timingSafeEqual(encoder.encode(given), encoder.encode(await sign(config, key, expires)));
  if (!valid) throw new ApiError(403, "The clip URL is not valid.", { code: "invalid_signature" });
  if (expires < Date.now() / 1000) throw new ApiError(403, "The clip URL has expired.", { code: "expired" });
  const object = await env.VOICES?.get(key);
  if (!object) throw new ApiError(404, "The clip no longer exists.", { code: "not_found" });
  return new Response(object.body, {
    headers: {
      "content-type": object.httpMetadata?.contentType || "application/octet-stream",
      "content-length": String(object.size),
      "cache-control": "private, no-store",
    },
  });
}

async function sign(config, key, expires) {
  const hmacKey = await crypto.subtle.importKey(
    "raw",
    encoder.encode(config.clipUrlSecret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = await crypto.subtle.sign("HMAC", hmacKey, encoder.encode(`${key}\n${expires}`));
  return Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
}
