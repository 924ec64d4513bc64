// Models, health, auth, CORS, unknown routes and methods, settings errors, secrets.
import { env } from "cloudflare:workers";
import { reset } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { RUNPOD_KEY, TOKEN, call, expectError, plan, speech, uniqueText } from "./helpers.js";

afterEach(() => {
  vi.restoreAllMocks();
  return reset();
});

describe("GET /v1/models", () => {
  it("lists the accepted models in OpenAI's list shape", async () => {
    const body = await (await call("/v1/models")).json();
    expect(body.object).toBe("list");
    expect(body.data.map((model) => model.id)).toEqual([
      "tts-1",
      "tts-1-hd",
      "gpt-4o-mini-tts",
      "gpt-4o-mini-tts-2025-12-15",
      "vibevoice-7b",
    ]);
    for (const model of body.data) {
      expect(model).toEqual({ id: model.id, object: "model", created: expect.any(Number), owned_by: "vibevoice" });
    }
  });

  it("lists them as {models} on /v1/audio/models, the shape Open WebUI reads", async () => {
    const body = await (await call("/v1/audio/models")).json();
    expect(body.models.map((model) => model.id)).toContain("tts-1");
    expect(body.models[0]).toMatchObject({ object: "model", owned_by: "vibevoice" });
  });

  it("retrieves one model, and answers 404 for others", async () => {
    expect(await (await call("/v1/models/tts-1-hd")).json()).toMatchObject({ id: "tts-1-hd", object: "model" });
    await expectError(await call("/v1/models/gpt-4o"), 404, { code: "model_not_found" });
  });

  it("lists models without a token (as Open WebUI asks) unless PUBLIC_LISTINGS is off", async () => {
    for (const path of ["/v1/models", "/v1/audio/models", "/v1/models/tts-1"]) {
      expect((await call(path, { auth: false })).status, path).toBe(200);
      await expectError(await call(path, { auth: false, envOverrides: { PUBLIC_LISTINGS: "false" } }), 401);
    }
  });
});

describe("GET /health", () => {
  it("needs no token and says what is configured, without secrets", async () => {
    const response = await call("/health", { auth: false });
    expect(response.status).toBe(200);
    const text = await response.text();
    expect(JSON.parse(text)).toEqual({
      status: "ok",
      runpod: { endpoint_configured: true, api_key_configured: true },
      voices_bucket: true,
      auth_required: true,
      keys_configured: true,
      public_listings: true,
    });
    expect(text).not.toContain(RUNPOD_KEY);
    expect(text).not.toContain(TOKEN);
    expect(text).not.toContain("127.0.0.1");
  });

  it("reports missing RunPod settings", async () => {
    const bare = {
      RUNPOD_API_KEY: undefined,
      RUNPOD_ENDPOINT_URL: undefined,
      AUTH_TOKEN: undefined,
      API_KEYS: undefined,
      VOICES: undefined,
    };
    const body = await (await call("/health", { auth: false, envOverrides: bare })).json();
    expect(body).toEqual({
      status: "ok",
      runpod: { endpoint_configured: false, api_key_configured: false },
      voices_bucket: false,
      auth_required: true, // closed: without a key nothing but the public routes answers
      keys_configured: false,
      public_listings: true,
    });
    const byId = await (
      await call("/health", { envOverrides: { RUNPOD_ENDPOINT_URL: undefined, RUNPOD_ENDPOINT_ID: "abc123" } })
    ).json();
    expect(byId.runpod.endpoint_configured).toBe(true);
  });
});

describe("auth", () => {
  const routes = [
    ["GET", "/v1/audio/voices/alloy"],
    ["POST", "/v1/audio/voices"],
    ["GET", "/v1/audio/voice_consents"],
    ["POST", "/v1/audio/voice_consents"],
    ["DELETE", "/v1/audio/voices/voice_0123456789abcdef01234567"],
    ["POST", "/v1/audio/speech"],
    ["GET", "/nowhere"],
  ];
  for (const [method, path] of routes) {
    it(`${method} ${path} needs the bearer token`, async () => {
      await expectError(await call(path, { method, auth: false }), 401, { code: "invalid_api_key" });
      await expectError(await call(path, { method, auth: false, headers: { authorization: "Bearer wrong" } }), 401, {
        message: /Incorrect/,
      });
      await expectError(await call(path, { method, auth: false, headers: { authorization: `Basic ${TOKEN}` } }), 401);
      await expectError(await call(path, { method, auth: false, headers: { authorization: `Bearer ${TOKEN}x` } }), 401);
    });
  }

  it("accepts the token whatever the case of 'Bearer'", async () => {
    expect((await call("/v1/models", { auth: false, headers: { authorization: `bearer ${TOKEN}` } })).status).toBe(200);
  });
});

describe("CORS", () => {
  it("answers preflights without a token", async () => {
    const response = await call("/v1/audio/speech", {
      method: "OPTIONS",
      auth: false,
      headers: {
        origin: "https://app.example",
        "access-control-request-headers": "authorization, content-type, x-stainless-os",
      },
    });
    expect(response.status).toBe(204);
    expect(response.headers.get("access-control-allow-origin")).toBe("*");
    expect(response.headers.get("access-control-allow-methods")).toContain("POST");
    expect(response.headers.get("access-control-allow-headers")).toContain("x-stainless-os");
  });

  it("marks answers and errors, with a configured origin", async () => {
    const ok = await call("/v1/models");
    expect(ok.headers.get("access-control-allow-origin")).toBe("*");
    expect(ok.headers.get("access-control-expose-headers")).toContain("x-runpod-job-id");
    const denied = await call("/v1/audio/voice_consents", {
      auth: false,
      envOverrides: { CORS_ALLOW_ORIGIN: "https://app.example" },
    });
    expect(denied.status).toBe(401);
    expect(denied.headers.get("access-control-allow-origin")).toBe("https://app.example");
    expect(denied.headers.get("vary")).toBe("Origin, Authorization");
  });
});

describe("routing and settings", () => {
  it("answers 404 for unknown routes and 405 for wrong methods", async () => {
    await expectError(await call("/v1/chat/completions", { method: "POST" }), 404, { code: "unknown_route" });
    await expectError(await call("/index.php"), 404, { code: "unknown_route" });
    const wrong = await call("/v1/audio/speech");
    await expectError(wrong, 405, { code: "method_not_allowed" });
    expect(wrong.headers.get("allow")).toBe("POST, OPTIONS");
    await expectError(await call("/v1/models", { method: "DELETE" }), 405);
    await expectError(await call("/v1/audio/voices/x", { method: "POST" }), 405);
  });

  it("answers 500 with the setting's name for a bad setting, without a stack", async () => {
    const response = await call("/v1/models", { envOverrides: { JOB_TIMEOUT_SECONDS: "soon" } });
    const error = await expectError(response, 500, { code: "bad_config", message: /JOB_TIMEOUT_SECONDS/ });
    expect(JSON.stringify(error)).not.toMatch(/at .*\.js/);
    await expectError(await call("/health", { envOverrides: { RUNPOD_ENDPOINT_URL: "ftp://x" } }), 500, {
      code: "bad_config",
    });
  });

  it("answers 500 without details when the bridge itself breaks", async () => {
    const broken = {
      get: () => Promise.reject(new TypeError(`secret ${RUNPOD_KEY}`)),
      list: () => Promise.reject(new TypeError("x")),
    };
    const logged = vi.spyOn(console, "error").mockImplementation(() => {});
    const error = await expectError(await call("/v1/audio/voices", { envOverrides: { VOICES: broken } }), 500, {
      code: "internal_error",
    });
    expect(error.message).not.toContain("secret");
    expect(logged.mock.calls.flat().join(" ")).not.toContain(RUNPOD_KEY);
  });
});

describe("secrets", () => {
  it("never shows the RunPod key, the token or presigned URLs in answers or logs", async () => {
    const lines = [];
    for (const level of ["log", "info", "warn", "error", "debug"]) {
      vi.spyOn(console, level).mockImplementation((...args) => lines.push(args.join(" ")));
    }
    const seen = [];
    const record = async (response) => {
      seen.push(
        JSON.stringify([...response.headers]),
        new TextDecoder().decode(await response.arrayBuffer().catch(() => new ArrayBuffer(0))),
      );
    };
    let text = uniqueText();
    await plan(text, { delivery: "url", http: { audio: 500 } });
    await record(await speech({ input: text }, { envOverrides: { STREAM_AUDIO: "false" } }));
    text = uniqueText();
    await plan(text, { chunks: ["a"], fail: "internal error while generating audio (X); the job was not completed." });
    await record(await speech({ input: text, stream_format: "audio" }));
    await record(await speech({ input: uniqueText() }, { envOverrides: { RUNPOD_API_KEY: `${RUNPOD_KEY}-rotated` } }));
    await record(await call("/v1/models", { auth: false, headers: { authorization: `Bearer ${TOKEN}-guess` } }));
    await record(await call("/health", { auth: false }));
    const everything = seen.join("\n") + lines.join("\n");
    expect(seen.length).toBe(10);
    for (const secret of [RUNPOD_KEY, TOKEN, "X-Amz-Signature", env.RUNPOD_ENDPOINT_URL]) {
      expect(everything).not.toContain(secret);
    }
  });
});
