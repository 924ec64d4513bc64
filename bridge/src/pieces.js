// A job's audio as pieces ({bytes, base64}) in order, checked to be whole.
//
// A streamed job's items come from /stream. The worker numbers them (`seq`) and counts them in its
// summary (`items`), so lost audio is found, and never passed off as a shorter file. A /stream
// reply that was lost on the way (RunPod handed its items out, the answer never arrived; a retried
// read brings the ones after) is not the end: the job's final output on /status holds every item
// (`return_aggregate_stream`), and the missing ones are taken from there once the job has ended.
// Only when that output lacks them too (the worker leaves the items out of a final output past
// RunPod's result limit) does the reply fail as incomplete.

import { ApiError } from "./errors.js";
import { fromBase64 } from "./http.js";

// The audio of streaming job `jobId` as pieces; fills `summary` from the worker's last item.
export async function* audioPieces(runpod, tie, jobId, format, deadline, summary) {
  const state = { nextSeq: 0, received: 0, finished: false };
  const context = { runpod, tie, format, deadline, summary, state };
  for await (const item of runpod.streamItems(jobId, { deadline, signal: tie.signal })) {
    if (missesItems(item, state)) {
      console.warn(`bridge: /stream of job ${jobId} skipped item ${state.nextSeq}; reading the job's final output`);
      yield* fromFinalOutput(context, jobId);
      return;
    }
    yield* itemPieces(item, context);
  }
  tie.settle();
  if (!whole(state, summary)) yield* fromFinalOutput(context, jobId);
  checkWhole(state, summary);
}

// The items the stream lost, and the rest, from the final output of the job once it has ended.
async function* fromFinalOutput(context, jobId) {
  const { runpod, tie, deadline, state, summary } = context;
  const job = await runpod.pollStatus({ id: jobId, status: "IN_PROGRESS" }, { deadline, signal: tie.signal });
  tie.settle();
  for (const item of Array.isArray(job.output) ? job.output : []) {
    if (missesItems(item, state)) break; // not in the final output either
    yield* itemPieces(item, context);
  }
  checkWhole(state, summary);
}

function missesItems(item, state) {
  return typeof item?.audio_chunk === "string" && typeof item.seq === "number" && item.seq > state.nextSeq;
}

function whole(state, summary) {
  return state.finished && (typeof summary.items !== "number" || summary.items === state.received);
}

function checkWhole(state, summary) {
  if (!state.finished) throw incomplete(`the stream ended without the worker's summary`);
  if (!whole(state, summary)) throw incomplete(`${state.received} of ${summary.items} audio items arrived`);
}

// The pieces of one item: its audio chunk (a repeated one is dropped), or a whole file (a worker
// that did not stream the job); the summary is kept.
async function* itemPieces(item, { runpod, tie, format, deadline, summary, state }) {
  if (!item || typeof item !== "object") return;
  if (item.status === "complete" || item.status === "completed") {
    Object.assign(summary, item);
    state.finished = true;
  }
  if (typeof item.audio_chunk === "string") {
    if (typeof item.seq === "number") {
      if (item.seq < state.nextSeq) return; // a repeated delivery
      state.nextSeq = item.seq + 1;
    }
    checkFormat(item, format);
    const bytes = fromBase64(item.audio_chunk);
    if (!bytes) {
      throw new ApiError(502, "The worker sent an audio chunk that is not base64.", { code: "upstream_bad_output" });
    }
    state.received += 1;
    if (bytes.byteLength) yield { bytes, base64: item.audio_chunk };
  } else if (item.audio_url || item.audio_base64) {
    const { result, audio } = await runpod.openAudio([item], deadline, tie.signal);
    checkFormat(result, format);
    Object.assign(summary, result);
    for await (const bytes of chunksOf(audio.stream)) yield { bytes, base64: null };
  }
}

// The chunks of a byte stream, as they arrive.
export async function* chunksOf(stream) {
  const reader = stream.getReader();
  let ended = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if ((ended = done)) return;
      if (value.byteLength) yield value;
    }
  } finally {
    if (!ended) await reader.cancel().catch(() => {}); // the reader stopped early: so does the download
  }
}

export function incomplete(why) {
  return new ApiError(502, `The audio from RunPod is incomplete: ${why}.`, { code: "upstream_incomplete" });
}

export function checkFormat(item, format) {
  if (item.format && item.format !== format.worker) {
    throw new ApiError(502, `The worker sent ${item.format} audio instead of ${format.worker}.`, {
      code: "upstream_bad_output",
    });
  }
}
