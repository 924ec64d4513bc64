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
// fetches them without one. Settings and deployment: README.md beside this file.

import { serveClip } from "./src/clips.js";
import { ConfigError, loadConfig } from "./src/config.js";
import { createConsent, deleteConsent, getConsent, listConsents, updateConsent } from "./src/consents.js";
import { ApiError, errorResponse } from "./src/errors.js";
import { checkAuth, corsHeaders, json, preflight, withHeaders } from "./src/http.js";
import { playgroundAsset, playgroundPage } from "./src/playground.js";
import { MODELS, createSpeech } from "./src/speech.js";
import { createVoice, deleteVoice, getVoice, listVoices } from "./src/voice_routes.js";

// A fixed date for /v1/models (the models do not change while the bridge runs).
const MODELS_CREATED = 1_735_689_600;

// `access`: "token" (the default) needs AUTH_TOKEN; "listing" answers without a token when
// PUBLIC_LISTINGS is on and none is sent (c.anonymous); "public" never needs one.
const ROUTES = [
  { path: /^\/v1\/audio\/speech\/?$/, methods: { POST: (c) => createSpeech(c.request, c.env, c.ctx, c.config) } },
  {
    path: /^\/v1\/audio\/voices\/?$/,
    access: "listing",
    methods: {
      GET: (c) => listVoices(c.env, c.config, { presetsOnly: c.anonymous }),
      POST: (c) => createVoice(c.request, c.env, c.config),
    },
  },
  {
    path: /^\/v1\/audio\/voices\/([^/]+)\/?$/,
    methods: {
      GET: (c, id) => getVoice(c.env, c.config, id),
      DELETE: (c, id) => deleteVoice(c.env, c.config, id),
    },
  },
  {
    path: /^\/v1\/audio\/voice_consents\/?$/,
    methods: {
      GET: (c) => listConsents(c.request, c.env, c.config),
      POST: (c) => createConsent(c.request, c.env, c.config),
    },
  },
  {
    path: /^\/v1\/audio\/voice_consents\/([^/]+)\/?$/,
    methods: {
      GET: (c, id) => getConsent(c.env, c.config, id),
      POST: (c, id) => updateConsent(c.request, c.env, c.config, id),
      DELETE: (c, id) => deleteConsent(c.env, c.config, id),
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
  { path: /^\/(?:playground\/?)?$/, access: "public", methods: page((c) => playgroundPage(c.config, c.path)) },
  {
    path: /^\/playground\/([\w.-]+)$/,
    access: "public",
    methods: page((c, name) => playgroundAsset(c.config, c.path, name)),
  },
];

export default {
  async fetch(request, env, ctx) {
    let config;
    try {
      config = loadConfig(env);
    } catch (error) {
      if (!(error instanceof ConfigError)) return errorResponse(error);
      return errorResponse(new ApiError(500, error.message, { code: "bad_config" }), corsHeaders({ corsOrigin: "*" }));
    }
    const cors = corsHeaders(config);
    if (request.method === "OPTIONS") return preflight(request, config);
    try {
      const response = await route(request, env, ctx, config);
      return withHeaders(response, cors);
    } catch (error) {
      return errorResponse(error, cors);
    }
  },
};

async function route(request, env, ctx, config) {
  const path = new URL(request.url).pathname;
  for (const entry of ROUTES) {
    const match = entry.path.exec(path);
    if (!match) continue;
    const anonymous = entry.access === "listing" && config.PUBLIC_LISTINGS && !request.headers.has("authorization");
    if (entry.access !== "public" && !(anonymous && request.method === "GET")) {
      await checkAuth(request, config.authToken);
    }
    const handler = entry.methods[request.method];
    if (!handler) {
      const allowed = Object.keys(entry.methods).join(", ");
      throw new ApiError(405, `${request.method} is not allowed on ${path}; use ${allowed}.`, {
        code: "method_not_allowed",
        headers: { allow: `${allowed}, OPTIONS` },
      });
    }
    const context = { request, env, ctx, config, path, anonymous: anonymous && Boolean(config.authToken) };
    return handler(context, ...match.slice(1).map(decodeSegment));
  }
  await checkAuth(request, config.authToken);
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
    auth_required: Boolean(config.authToken),
    public_listings: config.PUBLIC_LISTINGS,
  });
}
