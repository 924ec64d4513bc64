// A local HTTP server with RunPod's serverless API shapes, for the bridge's workerd tests.
//
// It stands in for RunPod's control plane only (the real worker loop is exercised by the Python
// end-to-end tests through the project's emulator). Each job behaves by the "plan" a test
// registered for its input text (POST /__plan), so tests running in parallel do not interfere:
//
//   {polls: n}              /runsync answers IN_PROGRESS, then /status n times before COMPLETED
//   {never: true}           the job never finishes
//   {fail: "sentence"}      the job FAILS with that error (also for streams, after `chunks`)
//   {status: "CANCELLED"}   the job ends with that status
//   {http: {op: code}}      the operation (run, runsync, status, stream, cancel, audio) answers HTTP code
//   {flaky: {op: n}}        the first n calls of the operation answer 503 (a passing gateway failure;
//                           op "audio": the audio URL)
//   {limited: {op: n}}      the first n calls answer 429 with Retry-After: {retryAfter} (default "0");
//                           a refused run or runsync starts no job (GET /__refused?text= counts them)
//   {delay: {op: ms}}       the operation answers after ms
//   {running: true}         a pending job reads RUNNING (a documented state) instead of IN_PROGRESS
//   {queued: ms}            the job waits IN_QUEUE for ms after submission (a cold start), then goes on
//   {delivery: "url"}       the result has an audio_url served by this server (else audio_base64)
//   {audio: "text"}         the result's audio bytes (default "AUDIO:<format>:<text>")
//   {audioSize: n}          the result's audio is n bytes (of 7)
//   {audioHold: true}       the audio URL sends half the file, then the rest after POST /__release
//   {audioShort: n}         the audio URL declares the whole file's length, sends n bytes and hangs up
//   {format: "wav"}         the format the result claims (default: the one asked for)
//   {chunks: ["a", "b"]}    streamed audio pieces; {hold: i} withholds piece i until POST /__release
//   {split: n}              the stream is all generated at once (the job is COMPLETED) and each /stream
//                           reply carries at most n items, as RunPod splits backlogs over 1 MB
//   {lose: i}               stream item i never arrives on /stream (a lost /stream reply); the job's
//                           final output on /status still holds it, as RunPod's aggregate does
//   {aggregate: "emptied"}  a streamed job's final output holds emptied items and the summary (the
//                           worker's answer to a result past RunPod's limit)
//   {streamError: "FAILED without error"} the failed /stream reply carries no error (the bridge asks /status)
//   {wholeInStream: true}   a streamed job yields one whole result instead of chunks
//   {output: value}         the COMPLETED output, verbatim
//
// GET /__jobs?text=... returns what the bridge sent for that text (inputs, policy, calls, cancellations).

import http from "node:http";

export const RUNPOD_KEY = "test-runpod-key-9c1f";

export function startStandin() {
  const plans = new Map();
  const jobs = new Map();
  const released = new Set();
  const refused = new Map(); // text -> submissions answered 429 or 503 before a job existed
  let counter = 0;

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    const body = await readBody(req);
    const send = (status, value, headers = {}) => {
      res.writeHead(status, { "content-type": "application/json", ...headers });
      res.end(typeof value === "string" ? value : JSON.stringify(value));
    };

    if (url.pathname === "/__plan") {
      const { text, plan } = JSON.parse(body);
      plans.set(text, plan);
      return send(200, { ok: true });
    }
    if (url.pathname === "/__release") {
      released.add(url.searchParams.get("text"));
      return send(200, { ok: true });
    }
    if (url.pathname === "/__refused") return send(200, { count: refused.get(url.searchParams.get("text")) || 0 });
    if (url.pathname === "/__jobs") {
      const text = url.searchParams.get("text");
      return send(200, [...jobs.values()].filter((job) => job.input?.text === text).map(publicJob));
    }
    const audioMatch = /^\/__audio\/(.+)$/.exec(url.pathname);
    if (audioMatch) {
      const job = jobs.get(audioMatch[1]);
      if (!job) return send(404, { error: "no such job" });
      job.downloads = (job.downloads || 0) + 1;
      if (job.downloads <= (job.plan.flaky?.audio || 0)) return send(503, { error: "slow down" });
      const code = job.plan.http?.audio;
      if (code) return send(code, "no");
      return sendAudio(res, job);
    }

    const match = /^\/v2\/([^/]+)\/(run|runsync|status|stream|cancel)(?:\/([^/?]+))?$/.exec(url.pathname);
    if (!match) return send(404, { error: "not found" });
    if (req.headers.authorization !== `Bearer ${RUNPOD_KEY}`) return send(401, { error: "Unauthorized" });
    const [, , op, id] = match;

    let job;
    if (op === "run" || op === "runsync") {
      if (req.method !== "POST") return send(405, { error: "method" });
      const { input, policy } = JSON.parse(body);
      const plan = plans.get(input?.text) || {};
      const seen = refused.get(input?.text) || 0;
      if (seen < (plan.limited?.[op] || 0)) {
        refused.set(input.text, seen + 1);
        return send(429, { error: "rate limited" }, { "retry-after": plan.retryAfter ?? "0" });
      }
      job = {
        id: `job-${++counter}`,
        input,
        policy,
        plan,
        op,
        polls: 0,
        streamCalls: 0,
        sent: 0,
        cancelled: false,
        wait: url.searchParams.get("wait"),
        submitted: Date.now(),
      };
      jobs.set(job.id, job);
    } else {
      job = jobs.get(id);
      if (!job) return send(404, { error: "job not found" });
      const expected = op === "cancel" ? "POST" : "GET";
      if (req.method !== expected) return send(405, { error: "method" });
    }
    job.calls = [...(job.calls || []), op];
    const delay = job.plan.delay?.[op];
    if (delay) await new Promise((resolve) => setTimeout(resolve, delay));
    const code = job.plan.http?.[op];
    if (code) return send(code, { error: `HTTP ${code} from the stand-in` });
    const faults = (job.faults ??= {});
    faults[op] = (faults[op] || 0) + 1;
    if (op !== "run" && op !== "runsync") {
      if (faults[op] <= (job.plan.flaky?.[op] || 0)) return send(503, { error: "upstream connect error" });
      if (faults[op] <= (job.plan.flaky?.[op] || 0) + (job.plan.limited?.[op] || 0)) {
        return send(429, { error: "rate limited" }, { "retry-after": job.plan.retryAfter ?? "0" });
      }
    }

    if (op === "cancel") {
      job.cancels = (job.cancels || 0) + 1;
      if (!job.finished) job.cancelled = true;
      return send(200, { id: job.id, status: job.cancelled ? "CANCELLED" : "COMPLETED" });
    }
    if (op === "run") return send(200, { id: job.id, status: "IN_QUEUE" });
    if (op === "runsync" || op === "status") {
      if (op === "status") job.polls++;
      return send(200, statusReply(job, op));
    }
    // stream
    job.streamCalls++;
    return send(200, streamReply(job, released.has(job.input.text)));
  });

  // Still waiting for a worker (a {queued: ms} plan).
  function queued(job) {
    return !job.cancelled && Date.now() - job.submitted < (job.plan.queued || 0);
  }

  function statusReply(job, op) {
    const plan = job.plan;
    if (job.cancelled) return { id: job.id, status: "CANCELLED" };
    if (queued(job)) return { id: job.id, status: "IN_QUEUE" };
    if (plan.never || (op === "runsync" && plan.polls) || job.polls < (plan.polls || 0)) {
      return { id: job.id, status: plan.running ? "RUNNING" : "IN_PROGRESS" };
    }
    job.finished = true;
    if (plan.fail) return { id: job.id, status: "FAILED", error: plan.fail };
    if (plan.status) return { id: job.id, status: plan.status };
    if (plan.output !== undefined) return { id: job.id, status: "COMPLETED", output: plan.output };
    if (job.input.stream && !plan.wholeInStream) return { id: job.id, status: "COMPLETED", output: aggregate(job) };
    return { id: job.id, status: "COMPLETED", output: [result(job)] };
  }

  // A streamed job's final output: every item it yielded (return_aggregate_stream), then the summary.
  function aggregate(job) {
    const chunks = job.plan.chunks || ["chunk-0", "chunk-1"];
    const items = chunks.map((_, seq) => (job.plan.aggregate === "emptied" ? {} : streamItem(job, seq)));
    return [...items, summaryOf(job)];
  }

  function streamItem(job, seq) {
    const chunks = job.plan.chunks || ["chunk-0", "chunk-1"];
    return {
      status: "streaming",
      seq,
      format: job.plan.format || job.input.output_format,
      sample_rate: job.input.sample_rate || 48000,
      audio_chunk: Buffer.from(chunks[seq]).toString("base64"),
    };
  }

  function summaryOf(job) {
    const chunks = job.plan.chunks || ["chunk-0", "chunk-1"];
    const summary = { status: "complete", format: job.input.output_format, duration_sec: 2.0, items: chunks.length };
    if (job.input.captions) summary.captions = `captions:${job.input.captions}`;
    return summary;
  }

  function result(job) {
    const bytes = audioBytes(job);
    const item = {
      status: "completed",
      format: job.plan.format || job.input.output_format,
      sample_rate: job.input.sample_rate || 48000,
      duration_sec: 1.2,
    };
    if (job.input.captions) item.captions = `captions:${job.input.captions}`;
    if (job.plan.delivery === "url") {
      item.audio_url = `http://127.0.0.1:${server.address().port}/__audio/${job.id}?X-Amz-Signature=secret`;
    } else {
      item.audio_base64 = Buffer.from(bytes).toString("base64");
    }
    return item;
  }

  function streamReply(job, isReleased) {
    const plan = job.plan;
    const pending = plan.running ? "RUNNING" : "IN_PROGRESS";
    if (job.cancelled) return { status: "CANCELLED", stream: [] };
    if (queued(job)) return { status: "IN_QUEUE", stream: [] };
    if (plan.never) return { status: pending, stream: [] };
    if (plan.fail && !plan.chunks) return { status: "FAILED", error: plan.fail, stream: [] };
    if (plan.wholeInStream) {
      if (job.sent) return { status: "COMPLETED", stream: [] };
      job.sent = 1;
      return { status: "COMPLETED", stream: [{ output: result(job) }] };
    }
    const chunks = plan.chunks || ["chunk-0", "chunk-1"];
    const held = plan.hold !== undefined && !isReleased ? plan.hold : chunks.length;
    const limit = plan.split ? Math.min(held, job.sent + plan.split) : held;
    const items = [];
    while (job.sent < limit) {
      const seq = job.sent++;
      if (seq === plan.lose) continue;
      items.push({ output: streamItem(job, seq) });
      if (plan.repeat) items.push(items[items.length - 1]); // a duplicated delivery
    }
    if (plan.split && job.sent < chunks.length) return { status: "COMPLETED", stream: items };
    if (job.sent < chunks.length) return { status: pending, stream: items };
    if (plan.fail) {
      return plan.streamError
        ? { status: "FAILED", stream: items }
        : { status: "FAILED", error: plan.fail, stream: items };
    }
    if (!job.finished) {
      job.finished = true;
      items.push({ output: summaryOf(job) });
    }
    return { status: "COMPLETED", stream: items };
  }

  function audioBytes(job) {
    if (job.plan.audioSize) return new Uint8Array(job.plan.audioSize).fill(7);
    return new TextEncoder().encode(job.plan.audio ?? `AUDIO:${job.input.output_format}:${job.input.text}`);
  }

  async function sendAudio(res, job) {
    const bytes = Buffer.from(audioBytes(job));
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(bytes.length) });
    if (job.plan.audioShort !== undefined) {
      res.write(bytes.subarray(0, job.plan.audioShort));
      return setTimeout(() => res.destroy(), 50);
    }
    if (!job.plan.audioHold) return res.end(bytes);
    const half = Math.floor(bytes.length / 2);
    res.write(bytes.subarray(0, half));
    for (let i = 0; i < 1000 && !released.has(job.input.text); i++) await new Promise((r) => setTimeout(r, 10));
    res.end(bytes.subarray(half));
  }

  function publicJob(job) {
    return {
      id: job.id,
      input: job.input,
      op: job.op,
      calls: job.calls,
      polls: job.polls,
      policy: job.policy,
      cancelled: job.cancelled,
      cancels: job.cancels || 0,
      wait: job.wait,
      sent: job.sent,
      downloads: job.downloads || 0,
    };
  }

  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const parts = [];
    req.on("data", (part) => parts.push(part));
    req.on("end", () => resolve(Buffer.concat(parts).toString("utf8")));
    req.on("error", reject);
  });
}
