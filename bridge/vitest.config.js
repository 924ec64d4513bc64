// The bridge's tests run inside workerd (the Workers runtime) through Cloudflare's Vitest plugin.
import { createHash } from "node:crypto";
import { cloudflareTest } from "@cloudflare/vitest-plugin";
import { defineConfig } from "vitest/config";
import { ADMINS, KEYS } from "./test/owners.js";
import { RUNPOD_KEY } from "./test/runpod-standin.js";

const digest = (key) => createHash("sha256").update(key).digest("hex");

export default defineConfig({
  plugins: [
    cloudflareTest(({ inject }) => ({
      wrangler: { configPath: "./wrangler.jsonc" },
      miniflare: {
        cf: false,
        bindings: {
          RUNPOD_ENDPOINT_URL: `http://127.0.0.1:${inject("runpodPort")}/v2/test-endpoint`,
          RUNPOD_API_KEY: RUNPOD_KEY,
          AUTH_TOKEN: "test-auth-token",
          API_KEYS: JSON.stringify(
            Object.fromEntries(Object.entries(KEYS).map(([owner, key]) => [owner, digest(key)])),
          ),
          ADMIN_OWNERS: ADMINS.join(","),
          CLIP_URL_SECRET: "test-clip-url-secret",
          PUBLIC_URL: "http://bridge.test",
          VOICES_CACHE_SECONDS: "0",
          POLL_INITIAL_MS: "20",
          POLL_MAX_MS: "50",
          STREAM_POLL_INITIAL_MS: "20",
          STREAM_POLL_MAX_MS: "50",
          RETRY_BASE_MS: "5",
          RETRY_MAX_MS: "20",
          // Tests name voices freely; the preset check and OpenAI's voice names have their own tests.
          PRESET_VOICES: "",
          OPENAI_VOICES: "false",
        },
      },
    })),
  ],
  test: {
    globalSetup: ["./test/global-setup.js"],
    include: ["test/**/*.spec.js"],
    // The JSON report feeds the reliability line that `make test` prints after pytest.
    reporters: ["default", ["json", { outputFile: ".vitest-report.json" }]],
  },
});
