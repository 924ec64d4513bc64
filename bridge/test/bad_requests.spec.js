// The malformed-request corpus (test/data/bad_requests.json): every case gets an OpenAI-shaped
// 4xx, with no trace of internals or secrets, and nothing reaches RunPod. Then: authentication
// comes before any other work, in constant time.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import corpus from "./data/bad_requests.json";
import { RUNPOD_KEY, TOKEN, call, expectError, jobs, uniqueText } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

// The corpus's placeholders and expansions (see "about" in the data file).
function expand(value, text) {
  if (typeof value === "string") {
    return value.replaceAll("$TEXT", text).replaceAll("$TOKEN_PREFIX", TOKEN.slice(0, -1)).replaceAll("$TOKEN", TOKEN);
  }
  if (Array.isArray(value)) return value.map((item) => expand(item, text));
  if (value && typeof value === "object") {
    if ("$repeat" in value) return value.$repeat[0].repeat(value.$repeat[1]);
    if ("$concat" in value) return value.$concat.map((piece) => expand(piece, text)).join("");
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, expand(item, text)]));
  }
  return value;
}

function request(entry, text) {
  const headers = expand(entry.headers || {}, text);
  const options = { method: entry.method, headers, auth: entry.auth === undefined };
  if (entry.auth !== undefined && entry.auth !== null) headers.authorization = expand(entry.auth, text);
  if ("body" in entry) options.body = expand(entry.body, text);
  if ("rawBody" in entry) options.body = expand(entry.rawBody, text);
  if ("bodyBase64" in entry) options.body = Uint8Array.from(atob(entry.bodyBase64), (c) => c.charCodeAt(0));
  if (typeof options.body === "string" && "body" in entry) options.body = JSON.stringify(options.body);
  return options;
}

describe("malformed requests corpus", () => {
  it("has at least 30 cases with distinct names", () => {
    expect(corpus.cases.length).toBeGreaterThanOrEqual(30);
    expect(new Set(corpus.cases.map((entry) => entry.name)).size).toBe(corpus.cases.length);
  });

  for (const entry of corpus.cases) {
    it(entry.name, async () => {
      const text = uniqueText("corpus");
      const response = await call(entry.path, request(entry, text));
      expect(response.status).toBeGreaterThanOrEqual(400);
      expect(response.status).toBeLessThan(500);
      expect(response.headers.get("content-type")).toBe("application/json");
      expect(response.headers.get("access-control-allow-origin")).toBe("*");
      const error = await expectError(response, entry.status, {
        param: entry.param,
        code: entry.code,
        type: entry.type ?? (entry.status === 401 ? "authentication_error" : "invalid_request_error"),
      });
      expect(Object.keys(error).sort()).toEqual(["code", "message", "param", "type"]);
      if (entry.message) expect(error.message).toContain(entry.message);
      // One sentence for the client: no stack, no newline, no secret, not the whole input back.
      expect(error.message.length).toBeGreaterThan(10);
      expect(error.message.length).toBeLessThan(400);
      expect(error.message).not.toMatch(/\n|\bat .*\.js|Error:|undefined/);
      for (const secret of [TOKEN, RUNPOD_KEY]) expect(error.message).not.toContain(secret);
      expect(await jobs(text)).toEqual([]); // nothing reached RunPod
    });
  }
});

describe("authentication comes first", () => {
  it("answers 401 without reading the body", async () => {
    let pulls = 0;
    const body = new ReadableStream({
      pull(controller) {
        pulls += 1;
        if (pulls > 100) return controller.close();
        controller.enqueue(new TextEncoder().encode(" ".repeat(1000)));
      },
    });
    const response = await call("/v1/audio/speech", {
      method: "POST",
      auth: false,
      body,
      headers: { "content-type": "application/json" },
    });
    await expectError(response, 401, { code: "invalid_api_key" });
    expect(pulls).toBeLessThanOrEqual(2); // at most what the runtime buffers ahead; never the whole body
  });

  it("compares SHA-256 digests of the key with every configured key's, whatever their length", async () => {
    // AUTH_TOKEN and the three keys of API_KEYS: each is compared, also after a match, so the
    // time taken says neither whether nor which key matched.
    const configured = 1 + Object.keys(JSON.parse(env.API_KEYS)).length;
    const compare = vi.spyOn(crypto.subtle, "timingSafeEqual");
    for (const guess of ["x", TOKEN.slice(0, -1), `${TOKEN}${TOKEN}`, TOKEN.replace(/.$/, "?")]) {
      await expectError(await call("/v1/models", { auth: false, headers: { authorization: `Bearer ${guess}` } }), 401);
    }
    expect(compare).toHaveBeenCalledTimes(4 * configured);
    for (const [given, expected] of compare.mock.calls) {
      expect([given.byteLength, expected.byteLength]).toEqual([32, 32]);
    }
    expect((await call("/v1/models")).status).toBe(200);
    expect(compare).toHaveBeenCalledTimes(5 * configured);
  });
});
