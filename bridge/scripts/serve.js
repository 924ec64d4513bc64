#!/usr/bin/env node
// Runs the bridge locally in workerd through Miniflare (wrangler's CLI needs Node 22; this does not).
//
//   BRIDGE_PORT   port on 127.0.0.1 (default 8787)
//   RUNPOD_URL    the RunPod endpoint base (default: the local emulator of `make serve`)
//   RUNPOD_API_KEY  the key for RUNPOD_URL (default: SERVE_API_KEY, the key `make serve` accepts)
//   AUTH_TOKEN, API_KEYS  the clients' keys (README.md); with neither (and no ALLOW_ANONYMOUS=true) this
//                 script makes a key for the run and prints it: the bridge is never open by default
//   CLIP_URL_SECRET, PUBLIC_URL  default: a random secret for the run, and this server's own URL
//   and any setting named in README.md
// The R2 bucket is in memory and starts empty, as a new deployment's: OpenAI's voice names speak with the
// presets (src/openai_voices.js). VOICES_JSON=path seeds a voices.json (voices.example.json is one).

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";
import { SETTING_NAMES, loadConfig } from "../src/config.js";

const BRIDGE = join(dirname(fileURLToPath(import.meta.url)), "..");

// wrangler.jsonc with its whole-line comments removed.
const wrangler = JSON.parse(readFileSync(join(BRIDGE, "wrangler.jsonc"), "utf8").replace(/^\s*\/\/.*$/gm, ""));
const port = Number(process.env.BRIDGE_PORT || 8787);
const runpodUrl = process.env.RUNPOD_URL || `http://127.0.0.1:${process.env.SERVE_PORT || 8000}/v2/vibevoice-local`;
const bindings = { ...wrangler.vars, RUNPOD_ENDPOINT_ID: "", RUNPOD_ENDPOINT_URL: runpodUrl };
for (const name of SETTING_NAMES) if (process.env[name]) bindings[name] = process.env[name];
bindings.RUNPOD_API_KEY = process.env.RUNPOD_API_KEY || process.env.SERVE_API_KEY || "";
bindings.AUTH_TOKEN = process.env.AUTH_TOKEN || "";
if (process.env.API_KEYS) bindings.API_KEYS = process.env.API_KEYS;
const open = loadConfig(bindings).ALLOW_ANONYMOUS;
const madeKey = !bindings.AUTH_TOKEN && !bindings.API_KEYS && !open;
if (madeKey) bindings.AUTH_TOKEN = "local-" + randomBytes(12).toString("hex");
// Clips reach the local worker by URLs this server signs and serves.
bindings.CLIP_URL_SECRET = process.env.CLIP_URL_SECRET || randomBytes(32).toString("hex");
bindings.PUBLIC_URL = process.env.PUBLIC_URL || `http://127.0.0.1:${port}`;

const miniflare = new Miniflare({
  name: wrangler.name,
  scriptPath: join(BRIDGE, wrangler.main),
  modules: true,
  modulesRoot: BRIDGE,
  // wrangler.jsonc's rules first (the playground's files are text), then every other .js is code.
  modulesRules: [
    ...(wrangler.rules || []).map((rule) => ({ type: rule.type, include: rule.globs, fallthrough: rule.fallthrough })),
    { type: "ESModule", include: ["**/*.js"] },
  ],
  compatibilityDate: wrangler.compatibility_date,
  compatibilityFlags: wrangler.compatibility_flags || [],
  r2Buckets: wrangler.r2_buckets.map((bucket) => bucket.binding),
  bindings,
  host: "127.0.0.1",
  port,
  cf: false,
});

const url = await miniflare.ready;
const bucket = await miniflare.getR2Bucket("VOICES");
const seed = process.env.VOICES_JSON;
if (seed) await bucket.put(bindings.VOICES_OBJECT_KEY || "voices.json", readFileSync(seed, "utf8"));
const auth = open ? "off (ALLOW_ANONYMOUS)" : "on";
const voices = seed ? `voices.json from ${seed}` : "no voices.json";
console.log(`bridge: listening on ${url.origin}/v1 (RunPod endpoint ${runpodUrl}; auth ${auth}; ${voices})`);
if (madeKey) {
  // A key for this run only, on this machine's console (set AUTH_TOKEN to choose one).
  console.log(`bridge: no AUTH_TOKEN or API_KEYS set; this run's key: ${bindings.AUTH_TOKEN}`);
}
if (loadConfig(bindings).PLAYGROUND) console.log(`bridge: playground at ${url.origin}/ (open it in a browser)`);

if (!bindings.RUNPOD_API_KEY) {
  console.log("bridge: no RUNPOD_API_KEY (or SERVE_API_KEY) set: speech requests will answer 503 until one is.");
}

async function stop() {
  await miniflare.dispose().catch(() => {});
  process.exit(0);
}
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
