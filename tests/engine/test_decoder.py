"""The own decode loop's steps against transformers' stock `generate`, on the tiny checkpoint in float32.

Mocked: nothing, except where a test says so. The stock loop is the reference: for one chunk the
own loop must give the same audio (within 1e-4), and a chunk decoded inside a batch must give the
audio it gives alone, whatever joins or leaves around it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from engine import decoder as decoder_module
from engine.batch import Batch, NonFiniteStateError, Sequence
from engine.decoder import BatchDecoder
from inference import GenerationParams, VibeVoiceEngine
from jobs.voices import VoiceLibrary
from text.script import Chunk, Turn

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


def request(engine: VibeVoiceEngine, chunk: Chunk, voices, frames: int, seed: int, with_voices: bool = True, **extra):
    params = GenerationParams(1.3, STEPS, seed=seed, max_new_tokens=frames, use_voice_prompt=with_voices)
    [made] = engine.requests([chunk], voices, params)
    return made if not extra else type(made)(**{**made.__dict__, **extra})


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
    [own] = engine.decoder.decode([request(engine, chunk, voices, 5, 1234, with_voices)])
    assert own.frames == 5 and own.audio.size == 5 * 3200
    assert max_difference(own.audio, expected) <= TOLERANCE
    # The comparison can fail: another seed gives other audio.
    other, _ = stock(engine, chunk, voices, frames=5, seed=99, with_voices=with_voices)
    assert max_difference(own.audio, other) > 100 * TOLERANCE


def test_a_chunk_in_a_batch_equals_the_chunk_alone(engine, voices, chunks) -> None:
    caps = {0: 6, 1: 3, 2: 5}  # different lengths: finished sequences leave the batch
    batch = engine.decoder.decode([request(engine, c, voices, caps[c.index], 7) for c in chunks])
    assert [b.index for b in batch] == [0, 1, 2]
    for chunk, together in zip(chunks, batch, strict=True):
        [alone] = engine.decoder.decode([request(engine, chunk, voices, caps[chunk.index], 7)])
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
    forced = {c.index: request(engine, c, voices, len(patterns[c.index]), 11, forced_tokens=tuple(patterns[c.index]))
              for c in chunks}  # fmt: skip
    for chunk in chunks:
        pattern = patterns[chunk.index]
        prompt_length = engine.prepare_inputs(chunk, voices, True)["input_ids"].shape[1]
        expected, tokens = stock(
            engine, chunk, voices, len(pattern), 11,
            logits_processor=LogitsProcessorList([ForcePattern(pattern, prompt_length)]),
        )  # fmt: skip
        assert tokens == pattern
        [own] = engine.decoder.decode([forced[chunk.index]])
        assert own.tokens == pattern and own.frames == pattern.count(frame)
        assert max_difference(own.audio, expected) <= TOLERANCE
        alone[chunk.index] = own
    batch = engine.decoder.decode([forced[c.index] for c in chunks])
    for together in batch:
        assert together.tokens == patterns[together.index]
        assert max_difference(together.audio, alone[together.index].audio) <= TOLERANCE
    assert not batch[1].reached_cap  # ended by end-of-text


def decode_by_hand(engine, requests: list, join_at: dict[int, int], park_at: dict[int, tuple[int, int]]):
    """The decoder's steps driven by hand: request i joins before frame `join_at[i]`; `park_at[i] =
    (a, b)` parks it before frame a and rejoins it before frame b. Returns each request's audio."""
    decoder = engine.decoder
    sequences = [Sequence(r) for r in requests]
    audio = {id(s): [] for s in sequences}
    batch, parked = Batch(), []
    with torch.inference_mode():
        for frame in range(64):
            joining = [s for i, s in enumerate(sequences) if join_at.get(i, 0) == frame]
            for sequence in joining:
                for _ in decoder.prefill(sequence):
                    pass
            rows = [batch.sequences.index(sequences[i]) for i, (a, _) in park_at.items() if a == frame]
            parked += decoder.park(batch, rows)
            back = [sequences[i] for i, (_, b) in park_at.items() if b == frame]
            decoder.join(batch, joining + back)
            if not batch.sequences and frame > max(join_at.values(), default=0) and not parked:
                break
            if batch.sequences:
                outputs = decoder.step(batch)
                for output in outputs:
                    if output.audio is not None:
                        audio[id(output.sequence)].append(output.audio.numpy())
                decoder.drop(batch, [row for row, output in enumerate(outputs) if not output.ended])
    return [np.concatenate(audio[id(s)]) for s in sequences]


def test_sequences_join_and_leave_at_arbitrary_frames(engine, voices, chunks) -> None:
    """Rows join a running batch (narrower and wider prompts than its cache) and leave it at
    different frames; one is parked (out of the batch, state kept) and rejoins: each sequence's
    audio equals its decode alone."""
    requests = [request(engine, c, voices, frames, seed) for c, frames, seed in
                [(chunks[0], 7, 1), (chunks[1], 5, 2), (chunks[2], 6, 3), (chunks[0], 4, 4)]]  # fmt: skip
    alone = [engine.decoder.decode([r])[0].audio for r in requests]
    joined = decode_by_hand(engine, requests, join_at={1: 2, 2: 3, 3: 5}, park_at={0: (3, 6)})
    for got, want in zip(joined, alone, strict=True):
        assert max_difference(got, want) <= TOLERANCE


def run_to_end(generator):
    """Exhaust a generator; its return value."""
    try:
        while True:
            next(generator)
    except StopIteration as done:
        return done.value


def test_prefill_is_per_sequence_finite_and_equals_an_unpadded_run(engine, voices, chunks) -> None:
    """A sequence prefilled alone (in pieces) holds exactly what one unpadded pass over its prompt
    gives; its rows in a left-padded batch see only their own columns."""
    decoder = engine.decoder
    sequence = Sequence(request(engine, chunks[0], voices, 4, 5))
    with torch.inference_mode():
        pieces = list(decoder.prefill(sequence))
        prompt = run_to_end(decoder._prompt_embeds(Sequence(sequence.request)))  # [prompt_len, hidden]
        cache = DynamicCache(config=engine.model.config.get_text_config(decoder=True))
        out = engine.model.model.language_model(inputs_embeds=prompt[None], past_key_values=cache, use_cache=True)
    state = sequence.state
    assert pieces == [] and torch.isfinite(state.positive_hidden).all()  # a short prompt is one piece
    assert torch.allclose(state.positive_hidden, out.last_hidden_state[0, -1], atol=1e-5)
    for (keys, values), layer in zip(state.positive_kv, cache.layers, strict=True):
        assert torch.allclose(keys, layer.keys, atol=1e-5) and torch.allclose(values, layer.values, atol=1e-5)


def test_long_prompts_are_prefilled_in_pieces(engine, voices, chunks, monkeypatch) -> None:
    """A prompt longer than PREFILL_PIECE_TOKENS yields between pieces; the audio is unchanged."""
    made = request(engine, chunks[0], voices, 4, 8)
    [whole] = engine.decoder.decode([made])
    monkeypatch.setattr(decoder_module, "PREFILL_PIECE_TOKENS", 16)
    sequence = Sequence(made)
    with torch.inference_mode():
        pieces = len(list(engine.decoder.prefill(sequence)))
    assert pieces == -(-made.input_ids.numel() // 16) - 1
    [pieced] = engine.decoder.decode([made])
    assert max_difference(pieced.audio, whole.audio) <= TOLERANCE


def test_voices_are_encoded_once_in_segments_and_equal_stock(engine, voices, chunks, monkeypatch) -> None:
    """Each distinct voice is encoded once (then taken from the cache), in segments through the
    encoder's streaming cache; the audio still equals stock `generate`."""
    monkeypatch.setattr(decoder_module, "VOICE_SEGMENT_SAMPLES", 3200 * 3)
    engine.decoder.voice_cache.clear()
    calls = {"n": 0}
    handle = engine.model.model.audio_tower.encoder.register_forward_hook(
        lambda *args: calls.__setitem__("n", calls["n"] + 1)
    )
    try:
        requests = [request(engine, c, voices, 3, 21) for c in chunks]  # voices 0, 1 and 2; 0 twice
        results = engine.decoder.decode(requests)
    finally:
        handle.remove()
    segments = sum(-(-clip.frames // 3) for clip in {c.key: c for r in requests for c in r.voices}.values())
    assert calls["n"] == segments and engine.decoder.voice_cache.encoded >= 3
    for chunk, result in zip(chunks, results, strict=True):
        expected, _ = stock(engine, chunk, voices, 3, 21)
        assert max_difference(result.audio, expected) <= TOLERANCE


def test_a_non_finite_prompt_state_is_refused(engine, voices, chunks) -> None:
    """Standing in for the NaN rows fused kernels can give on CUDA (the CPU gives none): a hook
    turns the prompt pass's output into NaN."""

    def nan_output(module, args, kwargs, output):
        output.last_hidden_state.fill_(float("nan"))
        return output

    handle = engine.model.model.language_model.register_forward_hook(nan_output, with_kwargs=True)
    try:
        with pytest.raises(NonFiniteStateError, match="chunk 2: the prompt's hidden state is not finite"):
            engine.decoder.decode([request(engine, chunks[2], voices, 2, 1)])
    finally:
        handle.remove()


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
