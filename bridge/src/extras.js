// VibeVoice fields a client may add to OpenAI's speech request (`extra_body` in the SDKs). The
// bridge passes them to the worker as given and the worker checks them; a worker error naming
// one is the client's 400 with that `param`.
//
//   streamedOnly  sent on streamed jobs only (the worker refuses it otherwise)
//   returned      a field of the worker's result that goes back to the client: in the SSE
//                 `speech.audio.done` event, and as the header `x-vibevoice-<name>` (base64 of
//                 the UTF-8 text, or of the JSON) on whole-file replies. A raw audio stream has
//                 no place for it, so asking for one makes an unspecified stream_format whole-file.

export const EXTRAS = {
  seed: {},
  cfg_scale: {},
  diffusion_steps: {},
  max_new_tokens: {},
  stream_chunk_ms: { streamedOnly: true },
  captions: { returned: true },
  caption_unit: {},
};

export const RETURNED = Object.keys(EXTRAS).filter((name) => EXTRAS[name].returned);

export const returnedHeader = (name) => `x-vibevoice-${name.replaceAll("_", "-")}`;
