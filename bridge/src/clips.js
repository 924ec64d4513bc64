// Signed, expiring URLs for reference clips in the voices bucket, served by the bridge itself.
//
// A clip (up to 10 MiB) reaches the worker as a `voice_url`, not as base64 inside the job, so it
// does not count against RunPod's 10 MB /run payload. R2 bindings cannot presign URLs (that
// takes the bucket's S3 API with a separate R2 API token, and Miniflare has no S3 endpoint), so
// the bridge signs its own: GET /voice-clips/{key}?expires=<unix s>&signature=<HMAC-SHA256 hex>,
// valid for as long as the job may live (its TTL), the same in production and in local runs. The
// key is CLIP_URL_SECRET, or derived from RUNPOD_API_KEY when that is unset. A signed URL is a
// credential: it stays out of messages and logs.

import { ApiError } from "./errors.js";

const PATH = "/voice-clips/";
const encoder = new TextEncoder();

// The URL the worker downloads `key` from, valid for `seconds`.
export async function clipUrl(key, request, config, seconds) {
  const expires = Math.floor(Date.now() / 1000) + Math.ceil(seconds);
  const origin = config.publicUrl || new URL(request.url).origin;
  const signature = await sign(config, key, expires);
  return `${origin}${PATH}${encodeURIComponent(key)}?expires=${expires}&signature=${signature}`;
}

// GET /voice-clips/{key}: the clip, when the signature is right and not expired.
export async function serveClip(request, env, config, key) {
  if (!config.clipUrlSecret && !config.runpodApiKey) throw new ApiError(404, "No clip URLs are signed here.");
  const url = new URL(request.url);
  const expires = Number(url.searchParams.get("expires"));
  const given = url.searchParams.get("signature") || "";
  const valid =
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
  const secret = config.clipUrlSecret || `vibevoice clip urls\n${config.runpodApiKey}`;
  const hmacKey = await crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = await crypto.subtle.sign("HMAC", hmacKey, encoder.encode(`${key}\n${expires}`));
  return Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
}
