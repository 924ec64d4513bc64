"""The reference side of the parity check: runs in .venv-reference (community `vibevoice` 0.0.1 on
transformers 4.51.3), never in the project's environment.

    .venv-reference/bin/python tools/parity_reference.py CASES.json OUT.npz

CASES.json names the community-layout checkpoint, a .npz of reference voices and the cases. For
each case it writes what the reference implementation makes of it into OUT.npz under "<case>/...":
the prompt (token ids, attention mask, speech-input mask, speech tensors and masks) and, for audio
cases, the generated waveform(s) and, for streaming cases, the AudioStreamer's chunks. It also
dumps the loaded state dict ("weights/<name>") and the loading report ("loading/<kind>").

Random weights never end the speech on their own, so generation suppresses eos, speech-end and
speech-start (the `suppress_tokens` of the native tiny checkpoint) and stops after `frames` steps.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(cases_path: str, out_path: str) -> None:
    import torch
    from vibevoice.modular.modeling_vibevoice_inference import VibeVoiceForConditionalGenerationInference
    from vibevoice.modular.streamer import AudioStreamer
    from vibevoice.processor.vibevoice_processor import VibeVoiceProcessor

    with open(cases_path) as handle:
        spec = json.load(handle)
    voices = dict(np.load(spec["voices"]))
    model, loading = VibeVoiceForConditionalGenerationInference.from_pretrained(
        spec["checkpoint"], torch_dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
    )
    model.eval()
    processor = VibeVoiceProcessor.from_pretrained(spec["checkpoint"])
    tokenizer = processor.tokenizer
    suppress = [tokenizer.eos_token_id, tokenizer.speech_end_id, tokenizer.speech_start_id]

    out: dict[str, np.ndarray] = {}
    for kind, names in loading.items():
        out[f"loading/{kind}"] = np.array([str(n) for n in names], dtype=str)
    for name, tensor in model.state_dict().items():
        out[f"weights/{name}"] = tensor.detach().cpu().numpy()

    for case in spec["cases"]:
        prefix = case["name"] + "/"
        samples = [[voices[key] for key in keys] for keys in case["voices"]] if case.get("voices") else None
        inputs = processor(
            text=case["scripts"], voice_samples=samples, padding=True, return_tensors="pt", return_attention_mask=True
        )
        out[prefix + "input_ids"] = inputs["input_ids"].numpy()
        out[prefix + "attention_mask"] = inputs["attention_mask"].numpy()
        out[prefix + "speech_input_mask"] = inputs["speech_input_mask"].numpy()
        if inputs["speech_tensors"] is not None:
            out[prefix + "speech_tensors"] = inputs["speech_tensors"].numpy()
            out[prefix + "speech_masks"] = inputs["speech_masks"].numpy()
        if case["kind"] not in ("audio", "stream"):
            continue
        model.set_ddpm_inference_steps(num_steps=case["steps"])
        streamer = AudioStreamer(batch_size=len(case["scripts"])) if case["kind"] == "stream" else None
        torch.manual_seed(case["seed"])
        with torch.no_grad():
            result = model.generate(
                **inputs,
                max_new_tokens=case["frames"],
                cfg_scale=case["cfg"],
                tokenizer=tokenizer,
                generation_config={"do_sample": False},
                suppress_tokens=suppress,
                audio_streamer=streamer,
                show_progress_bar=False,
                verbose=False,
            )
        for index, audio in enumerate(result.speech_outputs):
            out[prefix + f"audio/{index}"] = audio.reshape(-1).float().numpy()
        out[prefix + "sequences"] = result.sequences.numpy()
        if streamer is not None:
            chunks = [chunk.reshape(-1).float().numpy() for chunk in streamer.get_stream(0)]
            out[prefix + "stream_chunk_sizes"] = np.array([len(c) for c in chunks])
            out[prefix + "stream"] = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
