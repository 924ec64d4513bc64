// Speech requests through the official OpenAI Node SDK with its default retries (2), for
// tests/test_bridge_e2e.py, which counts the RunPod jobs each one started.
//   node test/e2e/node-retries.mjs <base URL> '<JSON list of request bodies>'
// Prints one JSON line per request: {"status": <HTTP status>, "bytes": <audio bytes>}.
import OpenAI from "openai";

const [baseURL, cases] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY, timeout: 120_000 });
for (const body of JSON.parse(cases)) {
  try {
    const response = await client.audio.speech.create(body);
    const bytes = (await response.arrayBuffer()).byteLength;
    console.log(JSON.stringify({ status: response.status, bytes }));
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;
    console.log(JSON.stringify({ status: error.status ?? 0, bytes: 0 }));
  }
}
