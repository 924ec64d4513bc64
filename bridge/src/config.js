// Settings from the Worker's environment (wrangler vars and secrets), with defaults.
//
// Numbers are given as strings in vars; a value that is not a number in range is a deployment
// error, reported by /health and by every request that needs it.

// OpenAI's limit for reference clips and consent recordings. Clips reach the worker as a signed
// URL, so they do not count against RunPod's 10 MB /run payload.
export const VOICE_BYTES_CEILING = 10 * 1024 * 1024;

const NUMBERS = {
  // A job's whole life as the bridge follows it: queueing (a cold start after scale-to-zero, several
  // minutes: docs/operations.md#cold-starts) and generation. Its RunPod TTL is this plus TTL_MARGIN_SECONDS.
  JOB_TIMEOUT_SECONDS: { fallback: 900, min: 1, max: 3600 },
  // Silence after which an SSE reply sends a keep-alive comment (and starts before its first audio).
  SSE_KEEPALIVE_SECONDS: { fallback: 15, min: 0.1, max: 300 },
  UPSTREAM_TIMEOUT_SECONDS: { fallback: 30, min: 1, max: 600 },
  // At most 25 s: a client that disconnects while /runsync waits is only known to RunPod by the
  // job id /runsync returns, and Workers keep running for about 30 s after a disconnect.
  RUNSYNC_WAIT_SECONDS: { fallback: 10, min: 1, max: 25 },
  POLL_INITIAL_MS: { fallback: 250, min: 10, max: 60_000 },
  POLL_MAX_MS: { fallback: 1000, min: 10, max: 60_000 },
  STREAM_POLL_INITIAL_MS: { fallback: 200, min: 10, max: 60_000 },
  STREAM_POLL_MAX_MS: { fallback: 1000, min: 10, max: 60_000 },
  RETRY_ATTEMPTS: { fallback: 4, min: 0, max: 10 },
  RETRY_BASE_MS: { fallback: 250, min: 1, max: 60_000 },
  RETRY_MAX_MS: { fallback: 4000, min: 1, max: 60_000 },
  CANCEL_ATTEMPTS: { fallback: 4, min: 1, max: 10 },
  TTL_MARGIN_SECONDS: { fallback: 30, min: 0, max: 3600 },
  EXECUTION_BASE_SECONDS: { fallback: 60, min: 6, max: 3600 },
  EXECUTION_SECONDS_PER_CHARACTER: { fallback: 0.2, min: 0, max: 60 },
  MAX_TEXT_LENGTH: { fallback: 4096, min: 1, max: 100_000 },
  VOICES_CACHE_SECONDS: { fallback: 30, min: 0, max: 3600 },
  MAX_VOICE_BYTES: { fallback: VOICE_BYTES_CEILING, min: 1_000, max: VOICE_BYTES_CEILING },
  MAX_REQUEST_BYTES: { fallback: 65_536, min: 1_024, max: 1_000_000 },
  // Per owner (keys.js): created voices and consent recordings each may keep.
  MAX_VOICES_PER_OWNER: { fallback: 100, min: 1, max: 1000 },
  MAX_CONSENTS_PER_OWNER: { fallback: 100, min: 1, max: 1000 },
  // The largest audio file the bridge passes on from the worker's storage (an hour of 24 kHz WAV
  // is 173 MB); it is streamed through, never held whole.
  MAX_AUDIO_BYTES: { fallback: 300_000_000, min: 1_000_000, max: 2_000_000_000 },
};

const FLAGS = {
  STREAM_AUDIO: true,
  // OpenAI's voice names (alloy, echo, ...) speak with preset voices unless voices.json maps them.
  OPENAI_VOICES: true,
  PUBLIC_LISTINGS: true,
  REQUIRE_VOICE_CONSENT: false,
  PLAYGROUND: true,
  ALLOW_ANONYMOUS: false,
};

// Every setting read from the environment besides the secrets (scripts/serve.js passes these on).
export const SETTING_NAMES = [
  ...Object.keys(NUMBERS),
  ...Object.keys(FLAGS),
  "CORS_ALLOW_ORIGIN",
  "VOICES_OBJECT_KEY",
  "PRESET_VOICES",
  "PUBLIC_URL",
  "ADMIN_OWNERS",
];

export class ConfigError extends Error {}

export function loadConfig(env) {
  const config = {};
  for (const [name, { fallback, min, max }] of Object.entries(NUMBERS)) {
    const raw = env[name];
    if (raw === undefined || raw === null || raw === "") {
      config[name] = fallback;
      continue;
    }
    const value = Number(raw);
    if (!Number.isFinite(value) || value < min || value > max) {
      throw new ConfigError(`The setting ${name} must be a number from ${min} to ${max}.`);
    }
    config[name] = value;
  }
  for (const [name, fallback] of Object.entries(FLAGS)) config[name] = flag(env, name, fallback);
  config.runpodEndpointUrl = endpointUrl(env);
  config.runpodApiKey = env.RUNPOD_API_KEY || "";
  config.authToken = env.AUTH_TOKEN || "";
  config.clipUrlSecret = env.CLIP_URL_SECRET || "";
  config.publicUrl = publicUrl(env);
  config.corsOrigin = env.CORS_ALLOW_ORIGIN || "*";
  config.voicesKey = env.VOICES_OBJECT_KEY || "voices.json";
  config.presetVoices = String(env.PRESET_VOICES || "")
    .split(",")
    .map((name) => name.trim())
    .filter(Boolean);
  return config;
}

function flag(env, name, fallback) {
  const raw = env[name];
  if (raw === undefined || raw === null || raw === "") return fallback;
  const text = String(raw).trim().toLowerCase();
  if (["true", "1", "yes", "on"].includes(text)) return true;
  if (["false", "0", "no", "off"].includes(text)) return false;
  throw new ConfigError(`The setting ${name} must be true or false.`);
}

// RUNPOD_ENDPOINT_URL (any base that serves /run, /runsync, /status, /stream, /cancel) wins over
// RUNPOD_ENDPOINT_ID, which names an endpoint on RunPod's API.
function endpointUrl(env) {
  if (env.RUNPOD_ENDPOINT_URL) return httpUrl(env.RUNPOD_ENDPOINT_URL, "RUNPOD_ENDPOINT_URL");
  if (env.RUNPOD_ENDPOINT_ID) {
    if (!/^[A-Za-z0-9_-]{1,100}$/.test(env.RUNPOD_ENDPOINT_ID)) {
      throw new ConfigError("The setting RUNPOD_ENDPOINT_ID must be a RunPod endpoint id (letters, digits, - and _).");
    }
    return `https://api.runpod.ai/v2/${env.RUNPOD_ENDPOINT_ID}`;
  }
  return "";
}

// The bridge's own origin as the RunPod worker reaches it, for signed clip URLs: required to sign
// one (clips.js), so that no request's Host header decides where the worker fetches from.
function publicUrl(env) {
  return env.PUBLIC_URL ? httpUrl(env.PUBLIC_URL, "PUBLIC_URL") : "";
}

function httpUrl(value, name) {
  let url;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigError(`The setting ${name} is not a URL.`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new ConfigError(`The setting ${name} must be an http(s) URL.`);
  }
  return url.href.replace(/\/+$/, "");
}
