#!/usr/bin/env node
// Drives the playground in headless Chromium (Debian's package, through playwright-core; no
// browser download) against a running bridge, and prints what it saw as one JSON object.
//
//   node test/browser/playground.mjs ORIGIN OUT_DIR [SCENARIO ...]
//   env: BRIDGE_TOKEN (the bridge's AUTH_TOKEN), CLIP (a reference clip for voice cloning),
//        CHROMIUM (default /usr/bin/chromium)
//
// tests/test_playground.py starts the chain (bridge -> RunPod emulator -> worker with the tiny
// checkpoint) and asserts on the result; screenshots and downloads go to OUT_DIR. Every wait is
// bounded. Each scenario reports {ok, ...observations} or {error}.

import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [origin, outDir, ...only] = process.argv.slice(2);
const TOKEN = process.env.BRIDGE_TOKEN || "";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Chromium on a closed network: no background connections, no first-run work; a fake microphone.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--use-fake-ui-for-media-stream",
  "--use-fake-device-for-media-stream",
];
// Tiny generations: the worker runs the random-weight checkpoint on the CPU.
const TINY = { "#diffusion-steps": "3", "#seed": "11" };
const WAIT = 60_000;
const AXE = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

const SCENARIOS = {
  plain,
  wav,
  voice,
  recording,
  script,
  errors,
  words,
  phone,
};

// --- helpers ---------------------------------------------------------------------------------------

// A page with the token given (when the bridge asks), plus what it logged and requested.
async function open(context, { token = TOKEN } = {}) {
  const page = await context.newPage();
  const seen = { console: [], requests: [] };
  page.on("console", (message) => {
    if (["error", "warning"].includes(message.type())) seen.console.push(message.text());
  });
  page.on("pageerror", (error) => seen.console.push(`page error: ${error.message}`));
  page.on("request", (request) => {
    const url = new URL(request.url());
    if (url.pathname.startsWith("/v1/")) {
      seen.requests.push({
        method: request.method(),
        path: url.pathname,
        authorization: request.headers().authorization ?? null,
        body: request.postData(),
      });
    }
  });
  page.seen = seen;
  await page.goto(origin + "/", { waitUntil: "domcontentloaded" });
  if (token) {
    await page.locator("#token-dialog[open]").waitFor({ timeout: WAIT });
    await page.fill("#token-input", token);
    await page.press("#token-input", "Enter");
    await page.locator("#token-dialog").waitFor({ state: "hidden", timeout: WAIT });
  }
  await page.waitForFunction(() => document.querySelector("#voice-0")?.options.length > 0, null, { timeout: WAIT });
  return page;
}

async function settings(page, values) {
  if (!(await page.locator("details").evaluate((node) => node.open))) await page.click("summary");
  for (const [selector, value] of Object.entries(values)) await page.fill(selector, value);
}

// Presses Speak (by default a click) and waits for the job to end, successfully or not.
async function speak(page, press = () => page.click("#speak")) {
  await page.evaluate(() => (document.querySelector("#result").dataset.state = "pressed"));
  await press();
  await page.waitForFunction(
    () => !["pressed", "running"].includes(document.querySelector("#result").dataset.state),
    null,
    {
      timeout: WAIT * 2,
    },
  );
  return page.evaluate(() => ({
    state: document.querySelector("#result").dataset.state,
    status: document.querySelector("#status").textContent,
    error: document.querySelector("#error").textContent,
    firstSoundMs: Number(document.querySelector("#result").dataset.firstSoundMs ?? NaN),
    streamEndMs: Number(document.querySelector("#result").dataset.streamEndMs ?? NaN),
    jobId: document.querySelector("#job-id").textContent,
  }));
}

// Seconds the <audio> element has played (its `played` ranges), once it passes `atLeast`.
async function played(page, atLeast) {
  await page.waitForFunction(
    (seconds) => {
      const ranges = document.querySelector("#player").played;
      let total = 0;
      for (let i = 0; i < ranges.length; i++) total += ranges.end(i) - ranges.start(i);
      return total > seconds && total;
    },
    atLeast,
    { timeout: WAIT },
  );
  return page.evaluate(() => {
    const ranges = document.querySelector("#player").played;
    let total = 0;
    for (let i = 0; i < ranges.length; i++) total += ranges.end(i) - ranges.start(i);
    return total;
  });
}

async function download(page, name) {
  const [file] = await Promise.all([page.waitForEvent("download", { timeout: WAIT }), page.click("#download")]);
  const path = join(outDir, name);
  await file.saveAs(path);
  return { path, suggested: file.suggestedFilename() };
}

async function axe(page) {
  await page.evaluate(AXE); // Evaluated through the DevTools protocol: the page's CSP does not apply.
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  return result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
}

// Confirms consent, presses Create voice and waits for the outcome.
async function createVoice(page) {
  await page.check("#clone-consent");
  await page.click("#clone-create");
  await page.waitForFunction(
    () =>
      !document.querySelector("#clone-create").disabled &&
      !/Creating/.test(document.querySelector("#clone-status").textContent),
    null,
    { timeout: WAIT },
  );
  return page.evaluate(() => ({
    status: document.querySelector("#clone-status").textContent,
    error: document.querySelector("#clone-error").textContent,
    picked: document.querySelector("#voice-0").value,
  }));
}

async function voiceIds(page) {
  return page.evaluate(async (token) => {
    const response = await fetch("/v1/audio/voices", { headers: token ? { authorization: `Bearer ${token}` } : {} });
    return (await response.json()).voices.map((voice) => voice.id);
  }, TOKEN);
}

// --- scenarios -------------------------------------------------------------------------------------

// Type, press Speak by keyboard, hear it stream; the download; axe before and after.
async function plain(context) {
  const page = await open(context);
  const axeBefore = await axe(page);
  await page.fill("#text", "The playground streams this sentence while it is generated.");
  await settings(page, { ...TINY, "#max-frames": "60" });
  // Keyboard only: Tab from the text area to Speak, then Enter.
  await page.focus("#text");
  let tabs = 0;
  while ((await page.evaluate(() => document.activeElement?.id)) !== "speak" && tabs < 40) {
    await page.keyboard.press("Tab");
    tabs++;
  }
  const job = await speak(page, () => page.keyboard.press("Enter"));
  const playedSeconds = await played(page, 0.6);
  await page.screenshot({ path: join(outDir, "playground.png"), fullPage: true });
  const file = await download(page, "plain-download");
  return {
    ...job,
    tabs,
    playedSeconds,
    download: file,
    axeBefore,
    axeAfter: await axe(page),
    requests: page.seen.requests,
    console: page.seen.console,
  };
}

// WAV streams through Web Audio; the download is a WAV with real sizes.
async function wav(context) {
  const page = await open(context);
  await page.fill("#text", "Sample by sample, through Web Audio.");
  await page.selectOption("#format", "wav");
  await settings(page, { ...TINY, "#max-frames": "45" });
  const job = await speak(page);
  return { ...job, download: await download(page, "wav-download"), console: page.seen.console };
}

// Create a voice from a clip file, pick it, speak with it, delete it.
async function voice(context) {
  const page = await open(context);
  await page.fill("#clone-name", "Test clone");
  await page.setInputFiles("#clone-file", process.env.CLIP);
  const created = await createVoice(page);
  const listedAfterCreate = await voiceIds(page);
  await page.fill("#text", "Spoken in a cloned voice.");
  await settings(page, { ...TINY, "#max-frames": "8" });
  const job = await speak(page);
  const body = JSON.parse(page.seen.requests.findLast((r) => r.path === "/v1/audio/speech").body);
  await page.click(`#created-voices button[aria-label="Delete Test clone"]`);
  await page.waitForFunction(() => /Deleted/.test(document.querySelector("#clone-status").textContent), null, {
    timeout: WAIT,
  });
  const optionsAfterDelete = await page.evaluate(() =>
    [...document.querySelector("#voice-0").options].map((o) => o.value),
  );
  return {
    created,
    listedAfterCreate,
    job,
    sentVoice: body.voice,
    optionsAfterDelete,
    listedAfterDelete: await voiceIds(page),
    console: page.seen.console,
  };
}

// Record from Chromium's fake microphone (a beep), create a voice from it, speak with it.
async function recording(context) {
  const page = await open(context);
  await page.click("#record");
  await page.waitForFunction(() => /Recording: [2-9]/.test(document.querySelector("#record-time").textContent), null, {
    timeout: WAIT,
  });
  await page.click("#record");
  await page.waitForFunction(() => /Recorded/.test(document.querySelector("#record-time").textContent), null, {
    timeout: WAIT,
  });
  await page.fill("#clone-name", "Microphone");
  const created = await createVoice(page);
  await page.fill("#text", "Spoken in a recorded voice.");
  await settings(page, { ...TINY, "#max-frames": "8" });
  const job = await speak(page);
  await page.click(`#created-voices button[aria-label="Delete Microphone"]`);
  await page.waitForFunction(() => /Deleted/.test(document.querySelector("#clone-status").textContent), null, {
    timeout: WAIT,
  });
  return { created, job, console: page.seen.console };
}

// A two-speaker script with a voice each.
async function script(context) {
  const page = await open(context);
  await page.check("#script-mode");
  await page.fill("#text", "Speaker 1: Welcome to the show.\nSpeaker 2: Glad to be here.");
  await page.waitForSelector("#voice-1");
  await page.selectOption("#voice-0", "alloy");
  await page.selectOption("#voice-1", "echo");
  await settings(page, { ...TINY, "#max-frames": "30" });
  const job = await speak(page);
  const playedSeconds = await played(page, 0.5);
  const labels = await page.locator("#voice-pickers label").allTextContents();
  const body = JSON.parse(page.seen.requests.findLast((r) => r.path === "/v1/audio/speech").body);
  return {
    ...job,
    playedSeconds,
    labels,
    sent: { speakers: body.speakers, voice: body.voice ?? null },
    console: page.seen.console,
  };
}

// The bridge's error sentences: a text over the limit, and a wrong token.
async function errors(context) {
  const page = await open(context);
  const limit = Number(await page.getAttribute("#text", "data-limit"));
  await page.fill("#text", "a".repeat(limit + 904));
  const counter = await page.textContent("#text-count");
  const tooLong = await speak(page);
  const wrong = await context.newPage();
  await wrong.goto(origin + "/");
  await wrong.locator("#token-dialog[open]").waitFor({ timeout: WAIT });
  await wrong.fill("#token-input", "not-the-token");
  await wrong.press("#token-input", "Enter");
  await wrong.waitForFunction(() => document.querySelector("#token-error").textContent, null, { timeout: WAIT });
  const wrongToken = await wrong.evaluate(() => ({
    error: document.querySelector("#token-error").textContent,
    dialogOpen: document.querySelector("#token-dialog").open,
    stored: sessionStorage.length,
  }));
  await wrong.screenshot({ path: join(outDir, "wrong-token.png") });
  return { limit, counter, tooLong, wrongToken };
}

// Word highlighting: "timestamps": true, the worker's word timings (on the tiny checkpoint's noise
// they are placed in order inside the audio), each word marked while it plays.
async function words(context) {
  const page = await open(context);
  await page.check("#highlight");
  await page.selectOption("#format", "wav");
  await page.fill("#text", "One two three.");
  await settings(page, { ...TINY, "#max-frames": "20" });
  const job = await speak(page);
  const sent = JSON.parse(page.seen.requests.findLast((r) => r.path === "/v1/audio/speech").body);
  const shown = await page.locator("#transcript .word").allTextContents();
  await page.evaluate(() => {
    const player = document.querySelector("#player");
    player.currentTime = 0;
    return player.play();
  });
  // Every word is marked in turn while the audio plays (bounded by the audio's length).
  const marked = new Set();
  const deadline = Date.now() + WAIT;
  while (marked.size < shown.length && Date.now() < deadline) {
    for (const word of await page.locator("#transcript .current").allTextContents()) marked.add(word);
    if (await page.evaluate(() => document.querySelector("#player").ended)) break;
    await page.waitForTimeout(20);
  }
  await page.screenshot({ path: join(outDir, "words.png") });
  return { job, sent, shown, marked: [...marked], console: page.seen.console };
}

// A phone-sized screen in dark mode: nothing wider than the screen, and still no axe violations.
async function phone(browser) {
  const context = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 1,
    isMobile: true,
    hasTouch: true,
    colorScheme: "dark",
  });
  try {
    const page = await open(context);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    // Before any job there is nothing to download or highlight.
    const visibleBeforeAJob = {
      download: await page.isVisible("#download"),
      transcript: await page.isVisible("#transcript"),
    };
    await page.screenshot({ path: join(outDir, "phone.png"), fullPage: true });
    return { overflow, visibleBeforeAJob, axe: await axe(page), console: page.seen.console };
  } finally {
    await context.close();
  }
}

// --- main ------------------------------------------------------------------------------------------

mkdirSync(outDir, { recursive: true });
const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, timeout: WAIT });
const results = {};
try {
  for (const [name, scenario] of Object.entries(SCENARIOS)) {
    if (only.length && !only.includes(name)) continue;
    const started = Date.now();
    const context =
      name === "phone"
        ? null
        : await browser.newContext({ viewport: { width: 1100, height: 900 }, acceptDownloads: true });
    try {
      results[name] = { ok: true, ...(await scenario(context ?? browser)) };
    } catch (error) {
      results[name] = { ok: false, error: String(error?.stack || error).slice(0, 3000) };
    } finally {
      results[name].seconds = (Date.now() - started) / 1000;
      await context?.close();
    }
  }
} finally {
  await browser.close();
}
writeFileSync(join(outDir, "results.json"), JSON.stringify(results, null, 2));
console.log(JSON.stringify(results));
