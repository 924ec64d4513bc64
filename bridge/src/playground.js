// The web playground: GET / (and /playground) serves one self-contained page that calls this
// bridge's public API like any client. Its HTML, CSS and JS live in ../playground/ and are bundled
// into the Worker as text (the "Text" module rule in wrangler.jsonc), so nothing loads from a CDN.
//
// The page holds no secret: when AUTH_TOKEN is set it asks the user for the token and sends it
// with every API call. PLAYGROUND=off removes these routes (they answer like unknown routes).

import { ApiError } from "./errors.js";
import indexHtml from "../playground/index.html";
import styleCss from "../playground/style.css";
import appJs from "../playground/app.js";
import apiJs from "../playground/api.js";
import playerJs from "../playground/player.js";
import cloneJs from "../playground/clone.js";
import wordsJs from "../playground/words.js";
import iconSvg from "../playground/icon.svg";

const JS = "text/javascript; charset=utf-8";
const ASSETS = {
  "style.css": { body: styleCss, type: "text/css; charset=utf-8" },
  "app.js": { body: appJs, type: JS },
  "api.js": { body: apiJs, type: JS },
  "player.js": { body: playerJs, type: JS },
  "clone.js": { body: cloneJs, type: JS },
  "words.js": { body: wordsJs, type: JS },
  "icon.svg": { body: iconSvg, type: "image/svg+xml" },
};

// Only this origin: scripts, styles and API calls. `blob:` is the audio the page itself makes
// (downloaded bytes and the MediaSource it streams into); `mediastream:` is not needed.
export const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "media-src 'self' blob:",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join("; ");

const SECURITY_HEADERS = {
  "content-security-policy": CONTENT_SECURITY_POLICY,
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
  "cross-origin-opener-policy": "same-origin",
  "permissions-policy": "microphone=(self), camera=(), geolocation=()",
  // Revalidate: a redeployed bridge serves its new page at once.
  "cache-control": "no-cache",
};

export function playgroundPage(config, path) {
  requireEnabled(config, path);
  const html = indexHtml.replaceAll("%MAX_TEXT_LENGTH%", String(config.MAX_TEXT_LENGTH));
  return new Response(html, { headers: { ...SECURITY_HEADERS, "content-type": "text/html; charset=utf-8" } });
}

export function playgroundAsset(config, path, name) {
  requireEnabled(config, path);
  const asset = Object.hasOwn(ASSETS, name) ? ASSETS[name] : null;
  if (!asset) throw unknown(path);
  return new Response(asset.body, { headers: { ...SECURITY_HEADERS, "content-type": asset.type } });
}

function requireEnabled(config, path) {
  if (!config.PLAYGROUND) throw unknown(path);
}

function unknown(path) {
  return new ApiError(404, `Unknown route: GET ${path.slice(0, 100)}.`, { code: "unknown_route" });
}
