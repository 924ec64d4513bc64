// Small HTTP helpers: JSON responses, CORS, bearer auth, size-capped bodies, base64.

import { invalid, tooLarge } from "./errors.js";

import { RETURNED, returnedHeader } from "./extras.js";

// Headers browsers may read from replies (clients show the job id, the model, the returned extras).
export const EXPOSED_HEADERS = [
  "x-runpod-job-id",
  "x-vibevoice-ignored",
  "x-vibevoice-model",
  "content-disposition",
  "retry-after",
  ...RETURNED.map(returnedHeader),
];

// On every API and clip answer (worker.js): answers depend on the caller's key, so no shared
// cache may keep one (and Vary says so to any that would), and no browser may sniff a type.
export const API_HEADERS = {
  "x-content-type-options": "nosniff",
  "cache-control": "private, no-store",
  vary: "Authorization",
};

export function json(value, status = 200, headers = {}) {
  return new Response(JSON.stringify(value), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

export function corsHeaders(config) {
  const headers = {
    "access-control-allow-origin": config.corsOrigin,
    "access-control-expose-headers": EXPOSED_HEADERS.join(", "),
  };
  if (config.corsOrigin !== "*") headers.vary = "Origin";
  return headers;
}

// CORS and API_HEADERS together (their Vary headers joined).
export function apiHeaders(config) {
  const cors = corsHeaders(config);
  return { ...cors, ...API_HEADERS, vary: cors.vary ? `${cors.vary}, ${API_HEADERS.vary}` : API_HEADERS.vary };
}

export function preflight(request, config) {
  return new Response(null, {
    status: 204,
    headers: {
      ...corsHeaders(config),
      "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
      // The SDKs send their own x-stainless-* headers; allow whatever the browser asks for.
      "access-control-allow-headers":
        request.headers.get("access-control-request-headers") || "authorization, content-type",
      "access-control-max-age": "86400",
    },
  });
}

// `headers` set on `response` (a Vary is added to the one there, not put in its place).
export function withHeaders(response, headers) {
  const merged = new Headers(response.headers);
  for (const [name, value] of Object.entries(headers)) {
    if (name.toLowerCase() === "vary" && merged.has("vary")) merged.set("vary", `${merged.get("vary")}, ${value}`);
    else merged.set(name, value);
  }
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers: merged });
}

// The body as bytes, refused with 413 as soon as it passes `limit` (declared or actual size).
export async function readBody(request, limit) {
  const declared = request.headers.get("content-length");
  if (declared !== null && Number(declared) > limit) throw bodyTooLarge(limit);
  if (!request.body) return new Uint8Array(0);
  const reader = request.body.getReader();
  const parts = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      throw bodyTooLarge(limit);
    }
    parts.push(value);
  }
  return concat(parts, size);
}

function bodyTooLarge(limit) {
  return tooLarge(`The request body is larger than the ${formatBytes(limit)} limit.`);
}

export async function readJsonObject(request, limit) {
  const bytes = await readBody(request, limit);
  let value;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw invalid("The request body is not valid JSON.");
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw invalid("The request body must be a JSON object.");
  }
  return value;
}

export function concat(parts, size = parts.reduce((total, part) => total + part.byteLength, 0)) {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.byteLength;
  }
  return out;
}

export function formatBytes(bytes) {
  if (bytes >= 1_000_000) return `${+(bytes / 1_000_000).toFixed(1)} MB`;
  if (bytes >= 1_000) return `${+(bytes / 1_000).toFixed(1)} KB`;
  return `${bytes} bytes`;
}

// Base64 in pieces: String.fromCharCode(...bytes) fails on large arrays.
export function toBase64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

// Returns null for text that is not base64.
export function fromBase64(text) {
  let binary;
  try {
    binary = atob(text.replace(/\s+/g, ""));
  } catch {
    return null;
  }
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
