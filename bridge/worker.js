// OpenAI-compatible text-to-speech API in front of the VibeVoice RunPod endpoint.
//
//   POST   /v1/audio/speech          text -> audio (mp3, opus, aac, flac, wav, pcm; streamed or whole)
//   GET    /v1/audio/voices          voices from voices.json and created clips
//   POST   /v1/audio/voices          store a reference clip as a new voice
//   GET    /v1/audio/voices/{id}     one voice
//   DELETE /v1/audio/voices/{id}     delete a created voice
//   *      /v1/audio/voice_consents[/{id}]   consent recordings (create, list, get, rename, delete)
//   GET    /v1/models                the model names (and /v1/audio/models, as Open WebUI reads them)
//   GET    /voice-clips/{key}        a clip for the worker, by signed URL (no token)
//   GET    /health                   whether the bridge is configured (no secrets, no auth)
//   GET    /, /playground            the web playground (no auth for the page; its API calls send the token)
// The listings (models, voices) answer without a token too when PUBLIC_LISTINGS is on: Open WebUI
// fetches them without one. Every other route needs a key (keys.js): without one configured the
// bridge is closed, unless ALLOW_ANONYMOUS. Settings and deployment: README.md beside this file.

import { serveClip } from "./src/clips.js";
import { ConfigError, loadConfig } from "./src/config.js";
import { createConsent, deleteConsent, getConsent, listConsents, updateConsent } from "./src/consents.js";
import { ApiError, errorResponse } from "./src/errors.js";
import { API_HEADERS, apiHeaders, corsHeaders, json, preflight, withHeaders } from "./src/http.js";
import { authenticate, hasKeys, loadKeys } from "./src/keys.js";
import { playgroundAsset, playgroundPage } from "./src/playground.js";
import { MODELS, createSpeech } from "./src/speech.js";
import { createVoice, deleteVoice, getVoice, listVoices } from "./src/voice_routes.js";

// A fixed date for /v1/models (the models do not change while the bridge runs).
const MODELS_CREATED = 1_735_689_600;

// `access`: "key" (the default) needs a key (c.caller: {owner, admin}); "listing" answers a GET
// without a key when PUBLIC_LISTINGS is on (c.caller null: presets only); "public" needs none.
const ROUTES = [
  {
    path: /^\/v1\/audio\/speech\/?$/,
    methods: { POST: (c) => createSpeech(c.request, c.env, c.ctx, c.config, c.caller) },
  },
  {
    path: /^\/v1\/audio\/voices\/?$/,
    access: "listing",
    methods: {
      GET: (c) => listVoices(c.request, c.env, c.config, c.caller),
      POST: (c) => createVoice(c.request, c.env, c.config, c.caller),
    },
  },
  {
    path: /^\/v1\/audio\/voices\/([^/]+)\/?$/,
    methods: {
      GET: (c, id) => getVoice(c.env, c.config, c.caller, id),
      DELETE: (c, id) => deleteVoice(c.env, c.config, c.caller, id),
    },
  },
  {
    path: /^\/v1\/audio\/voice_consents\/?$/,
    methods: {
      GET: (c) => listConsents(c.request, c.env, c.config, c.caller),
      POST: (c) => createConsent(c.request, c.env, c.config, c.caller),
    },
  },
  {
    path: /^\/v1\/audio\/voice_consents\/([^/]+)\/?$/,
    methods: {
      GET: (c, id) => getConsent(c.env, c.config, c.caller, id),
      POST: (c, id) => updateConsent(c.request, c.env, c.config, c.caller, id),
      DELETE: (c, id) => deleteConsent(c.request, c.env, c.config, c.caller, id),
    },
  },
  {
    path: /^\/v1\/models\/?$/,
    access: "listing",
    methods: { GET: () => json({ object: "list", data: MODELS.map(model) }) },
  },
  { path: /^\/v1\/models\/([^/]+)\/?$/, access: "listing", methods: { GET: (c, id) => getModel(id) } },
  {
    path: /^\/v1\/audio\/models\/?$/,
    access: "listing",
    methods: { GET: () => json({ models: MODELS.map(model), data: MODELS.map(model) }) },
  },
  {
    path: /^\/voice-clips\/([^/]+)$/,
    access: "public",
    methods: { GET: (c, key) => serveClip(c.request, c.env, c.config, key) },
  },
  { path: /^\/health\/?$/, access: "public", methods: { GET: (c) => health(c.env, c.config) } },
  {
    path: /^\/(?:playground\/?)?$/,
    access: "public",
    page: true,
    methods: page((c) => playgroundPage(c.config, c.path)),
  },
  {
    path: /^\/playground\/([\w.-]+)$/,
    access: "public",
    page: true,
    methods: page((c, name) => playgroundAsset(c.config, c.path, name)),
  },
];

export default {
  async fetch(request, env, ctx) {
    let config;
    try {
      config = loadConfig(env);
      config.keys = loadKeys(env, config.ALLOW_ANONYMOUS);
    } catch (error) {
      const headers = { ...corsHeaders({ corsOrigin: "*" }), ...API_HEADERS };
      if (!(error instanceof ConfigError)) return errorResponse(error, headers);
      return errorResponse(new ApiError(500, error.message, { code: "bad_config" }), headers);
    }
    // Every API and clip answer: not sniffed, not cached by anyone but the caller, keyed by the key.
    const headers = apiHeaders(config);
    if (request.method === "OPTIONS") {
      return withHeaders(preflight(request, config), { "x-content-type-options": "nosniff" });
    }
    try {
      const { response, page } = await route(request, env, ctx, config);
      return withHeaders(response, page ? corsHeaders(config) : headers);
    } catch (error) {
      return errorResponse(error, headers);
    }
  },
};

async function route(request, env, ctx, config) {
  const path = new URL(request.url).pathname;
  for (const entry of ROUTES) {
    const match = entry.path.exec(path);
    if (!match) continue;
    const publicListing = entry.access === "listing" && config.PUBLIC_LISTINGS && request.method === "GET";
    // Checked before anything else, the body included.
    const caller = entry.access === "public" ? null : await authenticate(request, config.keys, { publicListing });
    const handler = entry.methods[request.method];
    if (!handler) {
      const allowed = Object.keys(entry.methods).join(", ");
      throw new ApiError(405, `${request.method} is not allowed on ${path}; use ${allowed}.`, {
        code: "method_not_allowed",
        headers: { allow: `${allowed}, OPTIONS` },
      });
    }
    const context = { request, env, ctx, config, path, caller };
    return { response: await handler(context, ...match.slice(1).map(decodeSegment)), page: Boolean(entry.page) };
  }
  await authenticate(request, config.keys);
  throw new ApiError(404, `Unknown route: ${request.method} ${path}.`, { code: "unknown_route" });
}

// The playground's pages answer HEAD as well (the runtime sends no body for it).
function page(handler) {
  return { GET: handler, HEAD: handler };
}

function decodeSegment(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new ApiError(400, "The URL path is not valid percent-encoding.", { code: "bad_path" });
  }
}

function model(id) {
  return { id, object: "model", created: MODELS_CREATED, owned_by: "vibevoice" };
}

function getModel(id) {
  if (!MODELS.includes(id)) {
    throw new ApiError(404, `Model '${id.slice(0, 100)}' does not exist.`, { param: "model", code: "model_not_found" });
  }
  return json(model(id));
}

function health(env, config) {
  return json({
    status: "ok",
    runpod: {
      endpoint_configured: Boolean(config.runpodEndpointUrl),
      api_key_configured: Boolean(config.runpodApiKey),
    },
    voices_bucket: Boolean(env.VOICES),
    auth_required: !config.ALLOW_ANONYMOUS,
    keys_configured: hasKeys(config.keys),
    public_listings: config.PUBLIC_LISTINGS,
  });
}
