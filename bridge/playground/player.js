// Playback while the audio is still being generated, one strategy per format:
//
//   mp3       MediaSource on the <audio> element: the pieces of one MP3 stream are appended as
//             they arrive and play gap-free; the element is the player from the first second.
//   wav, pcm  Web Audio: 16-bit samples scheduled back to back on one AudioContext clock
//             (sample-exact, so no gaps); the <audio> element gets the finished file.
//   others    (opus in Ogg, aac, flac) play once the file is complete: Chromium's MediaSource
//             takes none of them as the bridge sends them.
//
// Every player keeps the received bytes for the download: `finish()` returns the file.

export const FORMATS = {
  mp3: { label: "MP3", extension: "mp3", type: "audio/mpeg", live: "MediaSource" },
  opus: { label: "Opus (Ogg, 48 kHz)", extension: "opus", type: "audio/ogg; codecs=opus", live: null },
  aac: { label: "AAC", extension: "aac", type: "audio/aac", live: null },
  flac: { label: "FLAC", extension: "flac", type: "audio/flac", live: null },
  wav: { label: "WAV", extension: "wav", type: "audio/wav", live: "WebAudio" },
  pcm: { label: "PCM (raw 16-bit, 24 kHz)", extension: "pcm", type: "audio/pcm", live: "WebAudio" },
};

// The bridge sends wav and pcm at 24 kHz, 16-bit mono.
const PCM_RATE = 24000;
// How far ahead of "now" the first samples are scheduled (and again after a stall).
const LEAD_SECONDS = 0.15;

// `hooks.firstSound()` is called when the first audio is heard, `hooks.stalled()` when playback
// had to wait for audio. `live: false` plays the file once complete, in the <audio> element.
export function createPlayer(format, audio, hooks, { live = true } = {}) {
  const spec = FORMATS[format];
  if (live && spec.live === "MediaSource" && globalThis.MediaSource?.isTypeSupported(spec.type)) {
    return new MediaSourcePlayer(audio, format, hooks);
  }
  if (live && spec.live === "WebAudio" && globalThis.AudioContext) return new PcmPlayer(audio, format, hooks);
  return new FilePlayer(audio, format, hooks);
}

// The <audio> element's current object URL, released when the next one replaces it.
let currentUrl = null;
function setSource(audio, source) {
  if (currentUrl) URL.revokeObjectURL(currentUrl);
  currentUrl = source ? URL.createObjectURL(source) : null;
  if (currentUrl) audio.src = currentUrl;
  else audio.removeAttribute("src");
}

class FilePlayer {
  constructor(audio, format, hooks) {
    this.audio = audio;
    this.format = format;
    this.hooks = hooks;
    this.parts = [];
    this.live = false;
    setSource(audio, null);
    audio.load();
  }

  push(bytes) {
    this.parts.push(bytes);
  }

  // Known once the file is complete and loaded.
  get receivedSeconds() {
    return Number.isFinite(this.audio.duration) && this.audio.src ? this.audio.duration : null;
  }

  async finish() {
    const file = new Blob(this.parts, { type: FORMATS[this.format].type });
    this.audio.addEventListener("playing", () => this.hooks.firstSound(), { once: true });
    setSource(this.audio, file);
    await loaded(this.audio);
    this.audio.play().catch(() => {}); // the user can still press play
    return file;
  }

  stop() {
    this.audio.pause();
  }
}

class MediaSourcePlayer extends FilePlayer {
  constructor(audio, format, hooks) {
    super(audio, format, hooks);
    this.live = true;
    this.queue = [];
    this.source = new MediaSource();
    setSource(this.audio, this.source);
    this.audio.addEventListener("playing", () => hooks.firstSound(), { once: true });
    this.audio.addEventListener("playing", () => (this.playing = true), { once: true });
    this.audio.addEventListener("waiting", () => this.playing && !this.ended && hooks.stalled());
    this.opened = new Promise((resolve) => this.source.addEventListener("sourceopen", resolve, { once: true }));
    this.opened.then(() => {
      this.buffer = this.source.addSourceBuffer(FORMATS[format].type);
      this.buffer.mode = "sequence";
      this.buffer.addEventListener("updateend", () => this.pump());
      this.pump();
    });
  }

  push(bytes) {
    super.push(bytes);
    this.queue.push(bytes);
    this.pump();
    if (!this.playRequested) {
      this.playRequested = true;
      this.audio.play().catch(() => {});
    }
  }

  pump() {
    if (!this.buffer || this.buffer.updating) return;
    if (this.queue.length) {
      this.buffer.appendBuffer(join(this.queue.splice(0)));
    } else if (this.drained) {
      this.drained();
    }
  }

  get receivedSeconds() {
    const ranges = this.buffer?.buffered;
    return ranges?.length ? ranges.end(ranges.length - 1) : 0;
  }

  async finish() {
    await this.opened;
    await new Promise((resolve) => {
      this.drained = resolve;
      this.pump();
    });
    this.ended = true;
    if (this.source.readyState === "open") this.source.endOfStream();
    return new Blob(this.parts, { type: FORMATS[this.format].type });
  }
}

class PcmPlayer extends FilePlayer {
  constructor(audio, format, hooks) {
    super(audio, format, hooks);
    this.live = true;
    this.wav = format === "wav" ? new WavReader() : null;
    this.rate = PCM_RATE;
    this.odd = null; // a byte left over from a piece of odd length
    this.samples = 0;
    this.next = 0;
    this.nodes = new Set();
    // Created inside the click that started the job: browsers only let a user gesture start audio.
    this.context = new AudioContext({ sampleRate: PCM_RATE });
  }

  push(bytes) {
    this.parts.push(bytes);
    let data = bytes;
    if (this.wav) {
      data = this.wav.read(data);
      if (!data) return;
      this.rate = this.wav.rate;
    }
    if (this.odd) data = join([this.odd, data]);
    const whole = data.byteLength & ~1;
    this.odd = whole < data.byteLength ? data.slice(whole) : null;
    if (whole) this.schedule(toFloat(data.subarray(0, whole)));
  }

  schedule(samples) {
    const buffer = this.context.createBuffer(1, samples.length, this.rate);
    buffer.copyToChannel(samples, 0);
    const node = this.context.createBufferSource();
    node.buffer = buffer;
    node.connect(this.context.destination);
    const now = this.context.currentTime;
    if (this.next < now + 0.01) {
      if (this.samples) this.hooks.stalled();
      this.next = now + LEAD_SECONDS;
    }
    if (!this.samples) setTimeout(() => this.hooks.firstSound(), (this.next - now) * 1000);
    node.start(this.next);
    this.next += buffer.duration;
    this.samples += samples.length;
    this.nodes.add(node);
    node.onended = () => this.nodes.delete(node);
  }

  get receivedSeconds() {
    return this.samples / this.rate;
  }

  async finish() {
    const pcm = this.wav ? this.wav.data(this.parts) : join(this.parts);
    const wavFile = wavBlob(pcm, this.rate);
    // The player gets a WAV either way (the stream's header has no sizes; this one has); the
    // download is what was asked for, raw for pcm.
    setSource(this.audio, wavFile);
    return this.wav ? wavFile : new Blob(this.parts, { type: FORMATS.pcm.type });
  }

  stop() {
    for (const node of this.nodes) node.stop();
    this.context.close();
  }
}

// A streamed WAV: the header (whose sizes are unknown while streaming), then 16-bit samples.
class WavReader {
  constructor() {
    this.head = new Uint8Array(0);
    this.offset = null; // where the samples start
  }

  // The sample bytes in `bytes`, or null while the header is incomplete.
  read(bytes) {
    if (this.offset !== null) return bytes;
    this.head = join([this.head, bytes]);
    const view = new DataView(this.head.buffer, this.head.byteOffset, this.head.byteLength);
    if (this.head.byteLength < 12) return null;
    if (ascii(this.head, 0, 4) !== "RIFF" || ascii(this.head, 8, 12) !== "WAVE") {
      throw new Error("The bridge sent a WAV stream without a RIFF header.");
    }
    for (let at = 12; at + 8 <= this.head.byteLength;) {
      const id = ascii(this.head, at, at + 4);
      const size = view.getUint32(at + 4, true);
      if (id === "fmt " && at + 16 <= this.head.byteLength) this.rate = view.getUint32(at + 12, true);
      if (id === "data") {
        this.offset = at + 8;
        return this.head.subarray(this.offset);
      }
      at += 8 + size + (size & 1);
    }
    return null;
  }

  // The samples of the whole received file (header left out).
  data(parts) {
    return join(parts).subarray(this.offset ?? 0);
  }
}

// Resolves when the element knows the duration, or could not load the file (bounded: 5 s).
function loaded(audio) {
  return new Promise((resolve) => {
    audio.addEventListener("loadedmetadata", resolve, { once: true });
    audio.addEventListener("error", resolve, { once: true });
    setTimeout(resolve, 5000);
  });
}

export function wavBlob(pcm, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, value) => [...value].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.byteLength, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, pcm.byteLength, true);
  return new Blob([header.buffer, pcm], { type: "audio/wav" });
}

function toFloat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const samples = new Float32Array(bytes.byteLength / 2);
  for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(i * 2, true) / 32768;
  return samples;
}

function join(parts) {
  const out = new Uint8Array(parts.reduce((size, part) => size + part.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}

function ascii(bytes, start, end) {
  return String.fromCharCode(...bytes.subarray(start, end));
}
