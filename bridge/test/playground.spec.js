// The web playground's routes: the page and its files, security headers, no secrets, the off switch.
// (tests/test_playground.py drives the page itself in headless Chromium.)
import { describe, expect, it } from "vitest";
import { RUNPOD_KEY, TOKEN, call, expectError } from "./helpers.js";

const FILES = {
  "style.css": "text/css",
  "app.js": "text/javascript",
  "api.js": "text/javascript",
  "player.js": "text/javascript",
  "clone.js": "text/javascript",
  "words.js": "text/javascript",
  "icon.svg": "image/svg+xml",
};

function expectSecurityHeaders(response) {
  const csp = response.headers.get("content-security-policy");
  expect(csp).toContain("default-src 'none'");
  expect(csp).toContain("script-src 'self'");
  expect(csp).toContain("connect-src 'self'");
  expect(csp).toContain("frame-ancestors 'none'");
  // Only the page's own origin (and the audio it makes itself, as blob: URLs).
  expect(csp.replace(/'self'|'none'|blob:/g, "")).not.toMatch(/'|https?:|\*|data:/);
  expect(response.headers.get("x-content-type-options")).toBe("nosniff");
  expect(response.headers.get("referrer-policy")).toBe("no-referrer");
}

describe("GET /", () => {
  it("serves the page without a token, with a strict CSP and no secrets", async () => {
    for (const path of ["/", "/playground", "/playground/"]) {
      const response = await call(path, { auth: false });
      expect(response.status).toBe(200);
      expect(response.headers.get("content-type")).toBe("text/html; charset=utf-8");
      expectSecurityHeaders(response);
      const html = await response.text();
      expect(html).toContain('<script type="module" src="/playground/app.js"></script>');
      expect(html).not.toContain(TOKEN);
      expect(html).not.toContain(RUNPOD_KEY);
      expect(html).toContain('data-limit="4096"');
    }
  });

  it("tells the page the text limit of this deployment (MAX_TEXT_LENGTH)", async () => {
    const html = await (await call("/", { auth: false, envOverrides: { MAX_TEXT_LENGTH: "2000" } })).text();
    expect(html).toContain('data-limit="2000"');
  });

  it("loads nothing from elsewhere and runs no inline script or style", async () => {
    const html = await (await call("/", { auth: false })).text();
    expect(html).not.toMatch(/(src|href)="(https?:)?\/\//);
    expect(html).not.toMatch(/<script(?![^>]*\ssrc=)[^>]*>/);
    expect(html).not.toMatch(/<style|\sstyle="|\son[a-z]+="/);
  });

  it("serves every file the page imports, with its type and the same headers", async () => {
    const pending = ["app.js", "style.css", "icon.svg"];
    const served = new Set();
    while (pending.length) {
      const name = pending.pop();
      if (served.has(name)) continue;
      served.add(name);
      const response = await call(`/playground/${name}`, { auth: false });
      expect(response.status, name).toBe(200);
      expect(response.headers.get("content-type")).toContain(FILES[name]);
      expectSecurityHeaders(response);
      const text = await response.text();
      expect(text).not.toMatch(/https?:\/\/(?!www\.w3\.org\/2000\/svg)/);
      for (const match of text.matchAll(/from "\.\/([\w.]+)"/g)) pending.push(match[1]);
    }
    expect([...served].sort()).toEqual(Object.keys(FILES).sort());
  });

  it("answers HEAD, and 404 for files it does not have", async () => {
    const head = await call("/", { method: "HEAD", auth: false });
    expect(head.status).toBe(200);
    await expectError(await call("/playground/secrets.js", { auth: false }), 404, { code: "unknown_route" });
    await expectError(await call("/playground/app.js/x", { auth: false }), 401);
  });

  it("is gone with PLAYGROUND=off; the API stays", async () => {
    for (const value of ["off", "false", "0"]) {
      const envOverrides = { PLAYGROUND: value };
      await expectError(await call("/", { auth: false, envOverrides }), 404, { code: "unknown_route" });
      await expectError(await call("/playground/app.js", { auth: false, envOverrides }), 404);
      expect((await call("/v1/models", { envOverrides })).status).toBe(200);
    }
  });
});
