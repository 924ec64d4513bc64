// One speech request through the official OpenAI Node SDK (used by tests/test_bridge_e2e.py).
//   node test/e2e/node-client.mjs <base URL> <output file> <voice>
// The key comes from OPENAI_API_KEY; the audio is written to the output file as received.
import { writeFileSync } from "node:fs";
import OpenAI from "openai";

const [baseURL, output, voice] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY, maxRetries: 0, timeout: 120_000 });
const response = await client.audio.speech.create({
  model: "tts-1",
  voice,
  input: "Hello from the Node SDK.",
  response_format: "wav",
  // VibeVoice settings ride along as extra body fields; tiny generations keep the test fast.
  max_new_tokens: 4,
  diffusion_steps: 3,
  seed: 1,
});
writeFileSync(output, Buffer.from(await response.arrayBuffer()));
console.log(JSON.stringify({ status: response.status, contentType: response.headers.get("content-type") }));
