"""The worker against the community reference implementation, on the same tiny weights.

The reference is the `vibevoice` package (0.0.1) that the original design ran; it only works on
transformers 4.51-4.53, so it runs in its own environment (.venv-reference, `make parity-env`) as
a subprocess (tools/parity_reference.py) that writes what it produced to a .npz file. Both sides
load the tiny checkpoint: the reference the community layout, the worker its conversion by
deploy/convert_checkpoint.py. Compared, per case:

- weights: every tensor the reference loaded equals the converted tensor (exactly), nothing missing;
- prompts: token ids, speech-input masks, attention masks and the normalised voice audio that the
  worker builds (VibeVoiceEngine.prepare_inputs) equal the reference processor's, exactly;
- audio: same seed, cfg scale and diffusion steps; the worker's waveform equals the reference
  `generate` within AUDIO_TOLERANCE (float32);
- own decode loop: the engine's batched loop (decoder.BatchDecoder), one chunk and a job of two
  chunks decoded together, against the reference generating each prompt;
- streaming: the reference AudioStreamer's chunks against the audio the engine hands out frame by
  frame (`on_audio`), and against the worker's whole audio.

`make parity` runs only this file and prints the measured differences.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deploy.convert_checkpoint import convert, native_name
from tools import tiny_checkpoint
from tools.local_home import synthetic_voice

# One xdist worker runs this module (its fixtures run the reference implementation once).
pytestmark = pytest.mark.xdist_group("parity")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / ".venv-reference" / "bin" / "python"
AUDIO_TOLERANCE = 1e-4  # max abs difference on float32 waveforms in [-1, 1]

SINGLE = "Hello there, how are you today?"
THREE = (
    "Speaker 1: Welcome back to the show.\n"
    "Speaker 2: Thanks, it is great to be here.\n"
    "Speaker 3: Likewise, let us get started."
)
TWO = "Speaker 1: Good morning.\nSpeaker 2: Good morning to you, too."

GEN_A = {"seed": 7, "cfg": 1.3, "steps": 3, "frames": 5}
GEN_B = {"seed": 11, "cfg": 2.0, "steps": 4, "frames": 5}
GEN_C = {"seed": 5, "cfg": 1.3, "steps": 3, "frames": 4}

# name -> (worker text, reference script, voice keys per script or None, generation or None)
CASES = {
    "prompt_single": ([SINGLE], [f"Speaker 1: {SINGLE}"], None, None),
    "prompt_single_voice": ([SINGLE], [f"Speaker 1: {SINGLE}"], [["alice"]], None),
    "prompt_three": ([THREE], [THREE], None, None),
    "prompt_three_voices": ([THREE], [THREE], [["alice", "frank", "carol"]], None),
    "audio_single": ([SINGLE], [f"Speaker 1: {SINGLE}"], [["alice"]], GEN_A),
    "audio_three_cloned": ([THREE], [THREE], [["alice", "frank", "carol"]], GEN_B),
    "audio_batch_of_two": ([SINGLE, TWO], [f"Speaker 1: {SINGLE}", TWO], [["alice"], ["frank", "carol"]], GEN_C),
    "stream_single": ([SINGLE], [f"Speaker 1: {SINGLE}"], [["alice"]], GEN_A),
    # The two chunks of one job (voices of speakers 0 and 1), each generated alone by the reference.
    "audio_job_chunk_0": ([SINGLE], [f"Speaker 1: {SINGLE}"], [["alice"]], GEN_C),
    "audio_job_chunk_1": ([TWO], [TWO], [["alice", "frank"]], GEN_C),
}  # fmt: skip


@pytest.fixture(scope="module")
def table():
    """Measured differences, printed when the module is done (visible with `make parity`)."""
    rows: list[tuple[str, str]] = []
    yield rows
    print("\n\nparity with the community reference implementation (vibevoice 0.0.1, transformers 4.51.3):")
    for name, value in rows:
        print(f"  {name:<48} {value}")


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    # Different lengths, none a multiple of 3200 samples, so padding paths are exercised.
    return {
        "alice": synthetic_voice(210.0, 1, seconds=2.0),
        "frank": synthetic_voice(115.0, 2, seconds=1.3),
        "carol": synthetic_voice(160.0, 3, seconds=1.7),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("parity")
    community = tiny_checkpoint.build_community(folder / "tiny-community", seed=0)
    return community, convert(community, folder / "tiny-hf")


@pytest.fixture(scope="module")
def reference(checkpoints, voices, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    if not REFERENCE_PYTHON.exists():
        pytest.fail("the reference environment is missing: build it with `make parity-env`")
    folder = tmp_path_factory.mktemp("reference")
    np.savez(folder / "voices.npz", **voices)
    cases = []
    for name, (_, scripts, voice_keys, generation) in CASES.items():
        kind = "prompt" if generation is None else name.split("_")[0]
        cases.append({"name": name, "kind": kind, "scripts": scripts, "voices": voice_keys, **(generation or {})})
    spec = {"checkpoint": str(checkpoints[0]), "voices": str(folder / "voices.npz"), "cases": cases}
    (folder / "cases.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [str(REFERENCE_PYTHON), str(ROOT / "tools" / "parity_reference.py"), str(folder / "cases.json"),
         str(folder / "out.npz")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    with np.load(folder / "out.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def engine(checkpoints, make_settings):
    from inference import VibeVoiceEngine

    return VibeVoiceEngine.load(make_settings(model_path=checkpoints[1]))


def worker_chunk(text: str):
    from text.script import chunk_script, parse_script

    chunks = chunk_script(parse_script(text), 5000)
    assert len(chunks) == 1
    return chunks[0]


def worker_voices(keys: list[str] | None, voices: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    return {speaker: voices[key] for speaker, key in enumerate(keys or [])}


def test_reference_loads_every_weight_of_the_community_checkpoint(reference, checkpoints, table):
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert reference[f"loading/{kind}"].size == 0, f"{kind}: {reference[f'loading/{kind}']}"
    converted = {}
    for shard in checkpoints[1].glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            converted.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    weights = {key.removeprefix("weights/"): value for key, value in reference.items() if key.startswith("weights/")}
    assert len(weights) == len(converted) == 308
    worst = 0.0
    for name, value in weights.items():
        ours = converted[native_name(name)]
        assert tuple(ours.shape) == value.shape, name
        worst = max(worst, float(np.abs(ours.numpy() - value).max()) if value.size else 0.0)
    table.append(("weights: max |converted - reference|", f"{worst:.1e} over {len(weights)} tensors"))
    assert worst == 0.0


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][3] is None])
def test_prompt_matches_the_reference_processor(name, engine, reference, voices, table):
    texts, _, voice_keys, _ = CASES[name]
    inputs = engine.prepare_inputs(worker_chunk(texts[0]), worker_voices(voice_keys and voice_keys[0], voices),
                                   with_voices=voice_keys is not None)  # fmt: skip
    ids = inputs["input_ids"].cpu().numpy()
    np.testing.assert_array_equal(ids, reference[f"{name}/input_ids"])
    np.testing.assert_array_equal(inputs["attention_mask"].cpu().numpy(), reference[f"{name}/attention_mask"])
    # The reference marks voice-embedding positions with a mask; the native model finds them by token id.
    np.testing.assert_array_equal(ids == engine.model.config.audio_token_id, reference[f"{name}/speech_input_mask"])
    detail = f"{ids.shape[1]} tokens equal"
    if voice_keys:
        # Voice audio: the same -25 dBFS normalisation; the worker pads to whole frames (3200 samples).
        ours = inputs["input_values"].cpu().numpy().reshape(len(voice_keys[0]), -1)
        theirs = reference[f"{name}/speech_tensors"]
        mask = inputs["padding_mask"].cpu().numpy().reshape(ours.shape).astype(bool)
        for row, (our_row, their_row) in enumerate(zip(ours, theirs, strict=True)):
            length = int(mask[row].sum())
            assert np.all(their_row[length:] == 0) and np.all(our_row[length:] == 0)
            np.testing.assert_allclose(our_row[:length], their_row[:length], rtol=0, atol=1e-7)
        frames = np.ceil(mask.sum(axis=1) / 3200).astype(int)
        np.testing.assert_array_equal(frames, reference[f"{name}/speech_masks"].sum(axis=1))
        detail += f", {len(voice_keys[0])} voice(s) equal"
    table.append((f"prompt {name.removeprefix('prompt_')}", detail))


def stock_audio(engine, texts, voice_keys, voices, generation) -> list[np.ndarray]:
    """The worker's stock path: generate_chunk per prompt; a batch goes through the same processor and
    `generate` call the engine uses, with the prompts batched (left-padded)."""
    from inference import GenerationParams

    params = GenerationParams(cfg_scale=generation["cfg"], diffusion_steps=generation["steps"],
                              seed=generation["seed"], max_new_tokens=generation["frames"])  # fmt: skip
    if len(texts) == 1:
        chunk = worker_chunk(texts[0])
        return [engine.generate_chunk(chunk, worker_voices(voice_keys[0], voices), params).audio]
    inputs = batch_inputs(engine, texts, voice_keys, voices)
    with torch.inference_mode():
        torch.manual_seed(params.seed)
        output = engine.model.generate(
            **inputs,
            max_new_tokens=params.max_new_tokens,
            guidance_scale=params.cfg_scale,
            num_diffusion_steps=params.diffusion_steps,
            return_dict_in_generate=True,
        )
    return [waveform.reshape(-1).float().numpy() for waveform in output.audio]


def batch_inputs(engine, texts, voice_keys, voices) -> dict:
    prompts = [engine.build_prompt(worker_chunk(text), with_voices=True) for text in texts]
    audio = [voices[key] for keys in voice_keys for key in keys]
    return engine.processor(text=prompts, audio=audio, sampling_rate=24000, padding=True, return_tensors="pt")


def test_batch_prompt_matches_except_for_the_padding_token(engine, reference, voices, table):
    """Both left-pad; the reference pads with <|image_pad|>, the worker with <|endoftext|> (masked either way)."""
    texts, _, voice_keys, _ = CASES["audio_batch_of_two"]
    inputs = batch_inputs(engine, texts, voice_keys, voices)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    theirs = reference["audio_batch_of_two/input_ids"]
    np.testing.assert_array_equal(mask, reference["audio_batch_of_two/attention_mask"])
    np.testing.assert_array_equal(ids[mask == 1], theirs[mask == 1])
    padded = int((mask == 0).sum())
    assert padded > 0
    tokenizer = engine.processor.tokenizer
    assert set(ids[mask == 0]) == {tokenizer.pad_token_id}
    assert set(theirs[mask == 0]) == {tokenizer.convert_tokens_to_ids("<|image_pad|>")}
    table.append(("prompt batch_of_two", f"{int(mask.sum())} attended tokens equal; {padded} padding ids differ"))


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("audio_")])
def test_audio_matches_the_reference_generate(name, engine, reference, voices, table):
    texts, _, voice_keys, generation = CASES[name]
    ours = stock_audio(engine, texts, voice_keys, voices, generation)
    worst = 0.0
    for index, waveform in enumerate(ours):
        theirs = reference[f"{name}/audio/{index}"]
        assert waveform.shape == theirs.shape == (generation["frames"] * 3200,)
        assert np.abs(theirs).max() > 0.01, "the reference produced near silence: the comparison would be empty"
        worst = max(worst, float(np.abs(waveform - theirs).max()))
    table.append((f"audio {name.removeprefix('audio_')} (stock generate)", f"max |diff| {worst:.2e}"))
    assert worst <= AUDIO_TOLERANCE


def test_reference_stream_chunks_match_the_worker_audio(engine, reference, voices, table):
    texts, _, voice_keys, generation = CASES["stream_single"]
    sizes = reference["stream_single/stream_chunk_sizes"]
    assert list(sizes) == [3200] * generation["frames"], "the reference streams one 3200-sample chunk per frame"
    streamed = reference["stream_single/stream"]
    np.testing.assert_array_equal(streamed, reference["stream_single/audio/0"])
    ours = stock_audio(engine, texts, voice_keys, voices, generation)[0]
    worst = float(np.abs(ours - streamed).max())
    table.append(("stream single (reference AudioStreamer)", f"max |diff| {worst:.2e} vs worker audio"))
    assert worst <= AUDIO_TOLERANCE


def params_for(generation: dict):
    from inference import GenerationParams

    return GenerationParams(cfg_scale=generation["cfg"], diffusion_steps=generation["steps"],
                            seed=generation["seed"], max_new_tokens=generation["frames"])  # fmt: skip


@pytest.mark.parametrize("name", ["audio_single", "audio_three_cloned"])
def test_own_decode_loop_matches_the_reference_generate(name, engine, reference, voices, table):
    texts, _, voice_keys, generation = CASES[name]
    assert engine.decode_loop == "own"
    [result] = engine.synthesize([worker_chunk(texts[0])], worker_voices(voice_keys[0], voices), params_for(generation))
    theirs = reference[f"{name}/audio/0"]
    assert result.audio.shape == theirs.shape
    worst = float(np.abs(result.audio - theirs).max())
    table.append((f"audio {name.removeprefix('audio_')} (own decode loop)", f"max |diff| {worst:.2e}"))
    assert worst <= AUDIO_TOLERANCE


def job_of_two_chunks():
    from text.script import Chunk, Turn

    return [
        Chunk(index=0, turns=(Turn(0, SINGLE),)),
        Chunk(index=1, turns=(Turn(0, "Good morning."), Turn(1, "Good morning to you, too."))),
    ]


def test_own_decode_loop_batch_matches_the_reference_prompt_by_prompt(engine, reference, voices, table):
    """A job's chunks decoded together equal the reference generating each chunk's prompt alone:
    every chunk has its own seeded noise, so batching does not change a chunk's audio."""
    chunks = job_of_two_chunks()
    results = engine.synthesize(chunks, {0: voices["alice"], 1: voices["frank"]}, params_for(GEN_C))
    worst = 0.0
    for result in results:
        theirs = reference[f"audio_job_chunk_{result.index}/audio/0"]
        assert result.audio.shape == theirs.shape
        worst = max(worst, float(np.abs(result.audio - theirs).max()))
    table.append(("audio job of two chunks (own loop, one batch)", f"max |diff| {worst:.2e} vs reference, per prompt"))
    assert worst <= AUDIO_TOLERANCE

    # The reference's own batch shares one noise stream across its rows, so its first row differs
    # from the same prompt generated alone (an intended difference, measured here).
    coupled = float(np.abs(reference["audio_batch_of_two/audio/0"] - reference["audio_job_chunk_0/audio/0"]).max())
    table.append(("reference batch row vs same prompt alone", f"max |diff| {coupled:.2e} (reference RNG coupling)"))
    assert coupled > AUDIO_TOLERANCE


def test_engine_streamed_frames_match_the_reference_streamer(engine, reference, voices, table):
    texts, _, voice_keys, generation = CASES["stream_single"]
    frames: list[np.ndarray] = []
    engine.synthesize([worker_chunk(texts[0])], worker_voices(voice_keys[0], voices), params_for(generation),
                      on_audio=lambda index, samples: frames.append(np.asarray(samples, dtype=np.float32)))  # fmt: skip
    assert [len(f) for f in frames] == list(reference["stream_single/stream_chunk_sizes"])
    worst = float(np.abs(np.concatenate(frames) - reference["stream_single/stream"]).max())
    table.append(("stream single (engine on_audio frames)", f"max |diff| {worst:.2e} vs reference AudioStreamer"))
    assert worst <= AUDIO_TOLERANCE


def test_streamed_job_matches_the_reference_streamer(engine, reference, voices, make_settings, tmp_path, table):
    """A whole `stream: true` job (pcm_16) through the worker's handler, with the voice cloned from
    a float WAV sent as base64, against the reference AudioStreamer's chunks."""
    import asyncio
    import base64
    import io

    import soundfile

    from handler import Worker

    texts, _, _, generation = CASES["stream_single"]
    clip = io.BytesIO()
    soundfile.write(clip, voices["alice"], 24000, format="WAV", subtype="FLOAT")
    job_input = {
        "text": texts[0],
        "voice_audio_base64": base64.b64encode(clip.getvalue()).decode(),
        "stream": True,
        "output_format": "pcm_16",
        "seed": generation["seed"],
        "cfg_scale": generation["cfg"],
        "diffusion_steps": generation["steps"],
        "max_new_tokens": generation["frames"],
    }
    worker = Worker(make_settings(vibevoice_home=tmp_path), engine)
    items = asyncio.run(worker.collect({"id": "parity-stream", "input": job_input}))
    assert isinstance(items, list) and items[-1]["status"] == "complete", items
    pcm = b"".join(base64.b64decode(item["audio_chunk"]) for item in items[:-1])
    ours = np.frombuffer(pcm, "<i2").astype(np.int32)
    theirs = np.round(np.clip(reference["stream_single/stream"], -1, 1) * 32767).astype(np.int32)
    assert ours.shape == theirs.shape
    worst = int(np.abs(ours - theirs).max())
    table.append(("stream single (streamed pcm_16 job)", f"max |diff| {worst} LSB (16-bit) vs reference AudioStreamer"))
    assert worst <= 1 + AUDIO_TOLERANCE * 32767
