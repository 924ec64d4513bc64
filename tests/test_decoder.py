"""The own decode loop against transformers' stock `generate`, on the tiny checkpoint in float32.

Mocked: nothing, except where a test says so. The stock loop is the reference: for one chunk the
own loop must give the same audio (within 1e-4), and a chunk decoded inside a batch must give the
audio it gives alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from decoder import BatchDecoder, DecodeRequest
from inference import CPU_AUTO_BATCH, GenerationParams, VibeVoiceEngine, auto_batch_size
from text import Chunk, Turn
from voices import VoiceLibrary

TOLERANCE = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def voices(settings) -> dict[int, np.ndarray]:
    """Short references (the codec encodes every reference sample on each prompt)."""
    library = VoiceLibrary.for_settings(settings)
    alice, frank = library.load("Alice"), library.load("Frank")
    return {0: alice[:24000], 1: frank[:30000], 2: alice[24000:40000]}


@pytest.fixture(scope="module")
def chunks() -> list[Chunk]:
    """Prompts of different lengths and speakers, so the batch is left-padded."""
    return [
        Chunk(0, (Turn(0, "The first chunk of a longer text, read by one voice."),)),
        Chunk(1, (Turn(1, "Second."), Turn(0, "Two speakers share this one."))),
        Chunk(2, (Turn(2, "A short third."),)),
    ]


def request(engine: VibeVoiceEngine, chunk: Chunk, voices, frames: int, seed: int, with_voices: bool = True):
    inputs = engine.prepare_inputs(chunk, voices, with_voices)
    return DecodeRequest(
        chunk.index, inputs["input_ids"][0], frames, seed, inputs.get("input_values"), inputs.get("padding_mask")
    )


def stock(engine: VibeVoiceEngine, chunk: Chunk, voices, frames: int, seed: int, **generate_kwargs):
    """transformers' generate for one chunk, seeded with the job seed as the engine does it."""
    inputs = engine.prepare_inputs(chunk, voices, generate_kwargs.pop("with_voices", True))
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = engine.model.generate(
            **inputs,
            max_new_tokens=frames,
            guidance_scale=1.3,
            num_diffusion_steps=STEPS,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    audio = output.audio[0]
    samples = audio.reshape(-1).numpy() if audio is not None else np.zeros(0, dtype=np.float32)
    return samples, output.sequences[0, inputs["input_ids"].shape[1] :].tolist()


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@pytest.mark.parametrize("with_voices", [True, False])
def test_one_chunk_equals_stock_generate(engine, voices, chunks, with_voices) -> None:
    chunk = chunks[1]
    expected, _ = stock(engine, chunk, voices, frames=5, seed=1234, with_voices=with_voices)
    [own] = engine.decoder.decode([request(engine, chunk, voices, 5, 1234, with_voices)], 1.3, STEPS)
    assert own.frames == 5 and own.audio.size == 5 * 3200
    assert max_difference(own.audio, expected) <= TOLERANCE
    # The comparison can fail: another seed gives other audio.
    other, _ = stock(engine, chunk, voices, frames=5, seed=99, with_voices=with_voices)
    assert max_difference(own.audio, other) > 100 * TOLERANCE


def test_a_chunk_in_a_batch_equals_the_chunk_alone(engine, voices, chunks) -> None:
    caps = {0: 6, 1: 3, 2: 5}  # different lengths: finished sequences leave the batch
    batch = engine.decoder.decode([request(engine, c, voices, caps[c.index], 7) for c in chunks], 1.3, STEPS)
    assert [b.index for b in batch] == [0, 1, 2]
    for chunk, together in zip(chunks, batch, strict=True):
        [alone] = engine.decoder.decode([request(engine, chunk, voices, caps[chunk.index], 7)], 1.3, STEPS)
        assert together.frames == caps[chunk.index]
        assert max_difference(together.audio, alone.audio) <= TOLERANCE
    # Each sequence draws from its own generator: same seed, different prompts, different audio.
    assert max_difference(batch[0].audio[:9600], batch[2].audio[:9600]) > 100 * TOLERANCE


class ForcePattern(LogitsProcessor):
    """Makes stock `generate` emit a fixed token sequence (the tiny model never chooses to)."""

    def __init__(self, pattern: list[int], prompt_length: int):
        self.pattern = pattern
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.pattern[input_ids.shape[1] - self.prompt_length]] = 0
        return forced


def test_speech_start_end_and_end_of_text_follow_the_stock_loop(engine, voices, chunks) -> None:
    """Speech-end pauses the frames, speech-start restarts the negative branch, end-of-text ends
    the sequence; sequences in one batch take those paths at different frames."""
    config = engine.model.config
    frame, start, end = config.audio_token_id, config.audio_bos_token_id, config.audio_eos_token_id
    eos = config.eos_token_id
    patterns = {
        0: [frame, frame, end, start, frame, frame, frame],
        1: [end, frame, frame, start, frame, eos],
        2: [start, frame, end, end, frame, start, start, frame],
    }
    alone = {}
    for chunk in chunks:
        pattern = patterns[chunk.index]
        prompt_length = engine.prepare_inputs(chunk, voices, True)["input_ids"].shape[1]
        expected, tokens = stock(
            engine, chunk, voices, len(pattern), 11,
            logits_processor=LogitsProcessorList([ForcePattern(pattern, prompt_length)]),
        )  # fmt: skip
        assert tokens == pattern
        [own] = engine.decoder.decode(
            [request(engine, chunk, voices, len(pattern), 11)], 1.3, STEPS,
            force_tokens=lambda index, step: patterns[index][step],
        )  # fmt: skip
        assert own.tokens == pattern and own.frames == pattern.count(frame)
        assert max_difference(own.audio, expected) <= TOLERANCE
        alone[chunk.index] = own
    batch = engine.decoder.decode(
        [request(engine, c, voices, len(patterns[c.index]), 11) for c in chunks], 1.3, STEPS,
        force_tokens=lambda index, step: patterns[index][step],
    )  # fmt: skip
    for together in batch:
        assert together.tokens == patterns[together.index]
        assert max_difference(together.audio, alone[together.index].audio) <= TOLERANCE
    assert not batch[1].reached_cap  # ended by end-of-text


def test_synthesize_streams_frames_in_chunk_order(engine, voices, chunks) -> None:
    params = GenerationParams(1.3, STEPS, seed=3, max_new_tokens=4)
    pieces: list[tuple[int, np.ndarray]] = []
    done: list[int] = []
    results = engine.synthesize(
        chunks,
        voices,
        params,
        on_chunk=lambda result, total: done.append(result.index),
        on_audio=lambda index, samples: pieces.append((index, samples.copy())),
    )
    assert [r.index for r in results] == done == [0, 1, 2]
    indices = [index for index, _ in pieces]
    assert indices == sorted(indices) and len(pieces) == 3 * 4  # frame by frame, chunk after chunk
    for result in results:
        streamed = np.concatenate([samples for index, samples in pieces if index == result.index])
        assert np.array_equal(streamed, result.audio)
    # The engine's own loop gives the stock loop's audio for every chunk, seeded with the job seed.
    for chunk, result in zip(chunks, results, strict=True):
        expected, _ = stock(engine, chunk, voices, 4, 3)
        assert max_difference(result.audio, expected) <= TOLERANCE


@pytest.mark.fault
def test_out_of_memory_halves_the_batch_and_keeps_the_audio(engine, voices, chunks, caplog) -> None:
    """A CUDA out-of-memory error cannot happen on this CPU: a forward hook raises it (the only
    stand-in) whenever the language model runs more than two sequences (four rows) at once."""
    params = GenerationParams(1.3, STEPS, seed=5, max_new_tokens=4)
    expected = engine.synthesize(chunks, voices, params)
    raised = {"count": 0}

    def out_of_memory_above_two(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[0] > 4:
            raised["count"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = engine.model.model.language_model.register_forward_pre_hook(out_of_memory_above_two, with_kwargs=True)
    saved = engine.batch_size, engine._oom_batch_limit
    engine.batch_size = 3
    pieces: list[tuple[int, np.ndarray]] = []
    try:
        with caplog.at_level(logging.WARNING, logger="vibevoice.engine"):
            results = engine.synthesize(chunks, voices, params, on_audio=lambda i, s: pieces.append((i, s)))
            again = engine.synthesize(chunks, voices, params)  # the lower limit sticks: no new error
    finally:
        handle.remove()
        engine.batch_size, engine._oom_batch_limit = saved
    assert raised["count"] == 1
    warnings = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert warnings == ["out of GPU memory at batch size 3; retrying with 1 from now on"]
    for got, later, want in zip(results, again, expected, strict=True):
        assert max_difference(got.audio, want.audio) <= TOLERANCE
        assert max_difference(later.audio, want.audio) <= TOLERANCE
        streamed = np.concatenate([s for i, s in pieces if i == got.index])
        assert streamed.size == want.audio.size  # nothing handed out twice after the retry


def test_stop_ends_every_sequence_between_frames(engine, voices, chunks) -> None:
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    requests = [request(engine, c, voices, 20, 1) for c in chunks]
    results = engine.decoder.decode(requests, 1.3, STEPS, should_stop=stop_after_two)
    assert [r.frames for r in results] == [2, 2, 2]


def test_batch_size_setting_and_automatic_size(engine, voices, chunks) -> None:
    requests = [request(engine, c, voices, 4, 1) for c in chunks]
    saved = engine.batch_size
    try:
        engine.batch_size = 2
        assert engine.pick_batch_size(requests) == 2
        engine.batch_size = 0  # automatic: CPU_AUTO_BATCH on the CPU, never more than the chunks
        assert engine.pick_batch_size(requests) == min(CPU_AUTO_BATCH, 3)
    finally:
        engine.batch_size = saved
    text = engine.model.config.text_config
    assert engine.kv_bytes_per_token() == 2 * text.num_hidden_layers * text.num_key_value_heads * 16 * 4
    # The real 7B in bf16: 57 344 bytes per token and row; 60 GB free, 1000-token sequences.
    assert auto_batch_size(60 * 2**30, 57_344, 1000) == 16
    assert auto_batch_size(4 * 2**30, 57_344, 1000) == 7
    assert auto_batch_size(100 * 2**20, 57_344, 1000) == 1


def test_bad_generation_config_is_refused(engine) -> None:
    config = engine.model.generation_config
    saved = config.suppress_tokens
    config.suppress_tokens = [
        engine.model.config.audio_token_id, engine.model.config.audio_bos_token_id,
        engine.model.config.audio_eos_token_id, engine.model.config.eos_token_id,
    ]  # fmt: skip
    try:
        with pytest.raises(ValueError, match="suppresses every token"):
            BatchDecoder(engine.model)
    finally:
        config.suppress_tokens = saved
