// OpenAI's response formats and what the worker is asked for to produce each.
//
// OpenAI's audio is 24 kHz except Opus, which always decodes at 48 kHz; pcm is raw
// 16-bit signed little-endian mono with no header. `streams`: the worker can send the
// format piece by piece while it generates (aac and flac come as whole files).

export const FORMATS = {
  mp3: { worker: "mp3", sampleRate: 24000, contentType: "audio/mpeg", streams: true },
  opus: { worker: "opus", sampleRate: null, contentType: "audio/opus", streams: true },
  aac: { worker: "aac", sampleRate: 24000, contentType: "audio/aac", streams: false },
  flac: { worker: "flac", sampleRate: 24000, contentType: "audio/flac", streams: false },
  wav: { worker: "wav", sampleRate: 24000, contentType: "audio/wav", streams: true },
  pcm: { worker: "pcm_16", sampleRate: 24000, contentType: "audio/pcm", streams: true },
};

export const FORMAT_NAMES = Object.keys(FORMATS);
