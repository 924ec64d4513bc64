// Settings from the Worker's environment (wrangler vars and secrets), with defaults.
//
// Numbers are given as strings in vars; a value that is not a number in range is a deployment
// error, reported by /health and by every request that needs it.

// RunPod's /run accepts 10 MB of input; a clip travels as base64 (4/3 of its size) next to
// the text, so 7 MB is the most a clip can be.
export const VOICE_BYTES_CEILING = 7_000_000;

const NUMBERS = {
  JOB_TIMEOUT_SECONDS: { fallback: 300, min: 1, max: 3600 },
  UPSTREAM_TIMEOUT_SECONDS: { fallback: 30, min: 1, max: 600 },
  RUNSYNC_WAIT_SECONDS: { fallback: 60, min: 1, max: 300 },
  POLL_INITIAL_MS: { fallback: 500, min: 10, max: 60_000 },
  POLL_MAX_MS: { fallback: 5000, min: 10, max: 60_000 },
  STREAM_POLL_INITIAL_MS: { fallback: 200, min: 10, max: 60_000 },
  STREAM_POLL_MAX_MS: { fallback: 2000, min: 10, max: 60_000 },
  VOICES_CACHE_SECONDS: { fallback: 30, min: 0, max: 3600 },
  MAX_VOICE_BYTES: { fallback: 5_000_000, min: 1_000, max: VOICE_BYTES_CEILING },
  MAX_REQUEST_BYTES: { fallback: 65_536, min: 1_024, max: 1_000_000 },
};

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
  config.runpodEndpointUrl = endpointUrl(env);
  config.runpodApiKey = env.RUNPOD_API_KEY || "";
  config.authToken = env.AUTH_TOKEN || "";
  config.corsOrigin = env.CORS_ALLOW_ORIGIN || "*";
  config.streamAudio = !["false", "0", "no", "off"].includes(String(env.STREAM_AUDIO ?? "true").toLowerCase());
  config.voicesKey = env.VOICES_OBJECT_KEY || "voices.json";
  config.playground = !["false", "0", "no", "off"].includes(String(env.PLAYGROUND ?? "on").toLowerCase());
  return config;
}

// RUNPOD_ENDPOINT_URL (any base that serves /run, /runsync, /status, /stream, /cancel) wins over
// RUNPOD_ENDPOINT_ID, which names an endpoint on RunPod's API.
function endpointUrl(env) {
  if (env.RUNPOD_ENDPOINT_URL) {
    let url;
    try {
      url = new URL(env.RUNPOD_ENDPOINT_URL);
    } catch {
      throw new ConfigError("The setting RUNPOD_ENDPOINT_URL is not a URL.");
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") {
      throw new ConfigError("The setting RUNPOD_ENDPOINT_URL must be an http(s) URL.");
    }
    return url.href.replace(/\/+$/, "");
  }
  if (env.RUNPOD_ENDPOINT_ID) {
    if (!/^[A-Za-z0-9_-]{1,100}$/.test(env.RUNPOD_ENDPOINT_ID)) {
      throw new ConfigError("The setting RUNPOD_ENDPOINT_ID must be a RunPod endpoint id (letters, digits, - and _).");
    }
    return `https://api.runpod.ai/v2/${env.RUNPOD_ENDPOINT_ID}`;
  }
  return "";
}
