"""Whole jobs through the worker (what RunPod calls), with the tiny checkpoint; audio is decoded.

Generation is kept to a few frames (max_new_tokens) so the suite stays fast on two cores.
"""

from __future__ import annotations

import base64
import urllib.request

import numpy as np
import pytest
from audio_helpers import encode_file, probe, tone

from audio import dsp, untrusted
from audio.formats import FORMATS
from jobs.voices import VoiceLibrary

FAST = {"max_new_tokens": 4, "diffusion_steps": 3}
CODECS = {"mp3": "mp3float", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "pcm_s16le"}
# Decoder delay/padding allowed around the claimed duration, in samples (see test_audio.py).
PADDING = {"aac": 2 * 1024 + 64, "mp3": 1152 + 576, "opus": 960, "flac": 0, "wav": 0, "pcm_16": 0}


def only(result) -> dict:
    assert isinstance(result, list) and len(result) == 1, result
    return result[0]


def audio_bytes(item: dict) -> bytes:
    if "audio_base64" in item:
        return base64.b64decode(item["audio_base64"])
    with urllib.request.urlopen(item["audio_url"], timeout=10) as response:
        return response.read()


def decoded(item: dict) -> np.ndarray:
    data = audio_bytes(item)
    if item["format"] == "pcm_16":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767
    return probe(data).samples


def test_default_job(run_job) -> None:
    item = only(run_job({"text": "Hello from the worker.", **FAST}))
    assert item["status"] == "completed" and item["format"] == "mp3" and item["delivery"] == "base64"
    assert item["sample_rate"] == 24000 and item["chunks"] == 1 and isinstance(item["seed"], int)
    info = probe(audio_bytes(item))
    assert info.codec == "mp3float" and info.sample_rate == 24000 and info.channels == 1
    assert abs(info.duration - item["duration_sec"]) <= PADDING["mp3"] / 24000
    assert item["duration_sec"] == pytest.approx(4 * 3200 / 24000, abs=1e-3)
    timings = item["timings"]
    assert set(timings) >= {"model_load_sec", "generate_sec", "encode_sec", "upload_sec", "real_time_factor"}
    assert item["segments"] == [
        {"index": 0, "speaker": "Speaker 1", "speakers": ["Speaker 1"], "text": "Hello from the worker.",
         "start_sec": 0.0, "end_sec": item["duration_sec"]}
    ]  # fmt: skip
    # What decoded it: the session's engine is the CPU's eager loop (COMPILE=auto is off on the CPU).
    assert item["engine"] == {
        "device": "cpu", "dtype": "float32", "attention": {"prefill": "sdpa", "decode": "sdpa"}, "compile": False,
        "compiled_buckets": {}, "diffusion_steps": 10, "weights": "bf16",
        "weight_bytes": item["engine"]["weight_bytes"], "fallbacks": [], "frames": {"compiled": 0, "uncompiled": 4},
    }  # fmt: skip
    assert item["engine"]["weight_bytes"] > 1_000_000  # the tiny checkpoint's float32 weights


def test_a_streamed_summary_reports_the_engine_with_every_chunk_counted(make_worker, run_job) -> None:
    items = run_job({"text": "The first sentence is here. The second one follows.", "max_chunk_chars": 40,
                     "stream": True, **FAST})  # fmt: skip
    summary = items[-1]
    assert summary["status"] == "complete" and summary["chunks"] == 2
    assert summary["engine"]["frames"] == {"compiled": 0, "uncompiled": 8}  # 4 frames in each of 2 chunks


MATRIX = [(fmt, rate) for fmt, spec in FORMATS.items() for rate in spec.sample_rates] + [("opus", None)]


@pytest.mark.parametrize(("fmt", "rate"), MATRIX)
def test_format_and_rate_matrix(run_job, fmt: str, rate: int | None) -> None:
    job = {"text": "Formats.", "output_format": fmt, "seed": 3, **FAST}
    if rate:
        job["sample_rate"] = rate
    item = only(run_job(job))
    claimed_rate = item["sample_rate"]
    assert claimed_rate == (rate or 48000)
    assert item["content_type"] == FORMATS[fmt].content_type
    if fmt == "pcm_16":
        samples = decoded(item)
        assert abs(samples.size / claimed_rate - item["duration_sec"]) < 1e-3
        return
    info = probe(audio_bytes(item))
    decoded_rate = 48000 if fmt == "opus" else claimed_rate  # Opus decodes at 48 kHz whatever it was encoded at
    assert (info.codec, info.sample_rate, info.channels) == (CODECS[fmt], decoded_rate, 1)
    assert abs(info.duration - item["duration_sec"]) <= PADDING[fmt] / claimed_rate + 1e-3


def test_pcm_alias(run_job) -> None:
    assert only(run_job({"text": "Raw.", "output_format": "pcm", **FAST}))["format"] == "pcm_16"


def test_multi_speaker_script_with_presets_and_clones(make_worker, run_job, http_files, settings) -> None:
    base, folder = http_files
    clone_wav = encode_file(tone(180, 2.0, 16000), 16000, "wav", "pcm_s16le")
    clone_url_mp3 = encode_file(tone(330, 1.5, 44100), 44100, "mp3", "libmp3lame")
    (folder / "third.mp3").write_bytes(clone_url_mp3)
    worker = make_worker(voice_url_allowed_networks="127.0.0.0/8")
    seen: list[tuple] = []
    prepare = worker.engine.prepare_inputs

    def spy(chunk, voices, with_voices):
        seen.append((chunk, {speaker: voices[speaker] for speaker in chunk.speakers}))
        return prepare(chunk, voices, with_voices)

    worker.engine.prepare_inputs = spy
    try:
        script = (
            "Speaker 1: Welcome to the show.\nSpeaker 2: Thanks for having me here today.\n"
            "Speaker 3: And I am the third voice.\nSpeaker 1: Let us begin."
        )
        job = {
            "text": script,
            "speakers": [
                "Alice",
                {"audio_base64": base64.b64encode(clone_wav).decode()},
                {"audio_url": f"{base}/third.mp3"},
            ],
            "max_chunk_chars": 60,
            "output_format": "wav",
            **FAST,
        }
        item = only(run_job(job, worker=worker))
    finally:
        worker.engine.prepare_inputs = prepare

    library = VoiceLibrary.for_settings(settings)
    decode = lambda data: untrusted.decode(data, 24000, 300).samples  # noqa: E731
    expected = {0: library.load("Alice"), 1: decode(clone_wav), 2: decode(clone_url_mp3)}
    assert len(seen) == item["chunks"] >= 2
    for chunk, voices in seen:
        assert set(voices) == set(chunk.speakers)
        for speaker, reference in voices.items():
            assert np.array_equal(reference, expected[speaker])
    labels = [turn_speaker for chunk, _ in seen for turn_speaker in (t.speaker for t in chunk.turns)]
    assert labels == [0, 1, 2, 0]
    segments = item["segments"]
    assert [s["index"] for s in segments] == list(range(len(segments)))
    assert segments[0]["speaker"] == "Speaker 1"
    assert [label for s in segments for label in s["speakers"]][:2] == ["Speaker 1", "Speaker 2"]
    spans = [(s["start_sec"], s["end_sec"]) for s in segments]
    assert all(a < b for a, b in spans) and all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))
    assert spans[-1][1] == pytest.approx(item["duration_sec"], abs=2e-3)


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ({"text": "Speaker 1: Hi.\nSpeaker 3: Yo.", "speakers": ["Alice", "Frank"]}, "but 'text' uses Speaker 3"),
        ({"text": "No labels here.", "speakers": ["Alice"]}, "'speakers' needs a script"),
        ({"text": "Speaker 1: Hi.\nSpeaker 2: Yo."}, "give their voices in 'speakers'"),
        (
            {"text": "Hi.", "speaker": "Nobody"},
            "unknown voice 'Nobody'; available voices: en-Alice_woman, en-Frank_man",
        ),
        ({"text": "Hi.", "speaker": "../../etc/passwd"}, "unknown voice '../../etc/passwd'"),
        ({"text": "Hi.", "voice_audio_base64": "@@@"}, "'voice_audio_base64' is not valid base64"),
        ({"text": "Hi.", "voice_url": "http://127.0.0.1:9/x.wav"}, "private, loopback, link-local or reserved"),
        ({"text": "Speaker 1: Hi.\nplain line"}, "line 2 has no 'Speaker N:' label"),
        ({"text": "Hi.", "speakers": ["a", "b", "c", "d", "e"]}, "at most 4 speakers"),
    ],
)
def test_bad_jobs_fail_with_one_sentence_and_the_worker_keeps_serving(make_worker, job, fragment) -> None:
    import asyncio

    worker = make_worker()
    result = asyncio.run(worker.collect({"id": "bad", "input": {**job, **FAST}}))
    assert set(result) == {"error"}, result
    assert fragment in result["error"] and "\n" not in result["error"] and "Traceback" not in result["error"]
    good = asyncio.run(worker.collect({"id": "good", "input": {"text": "Still serving.", **FAST}}))
    assert only(good)["status"] == "completed"


def test_missing_default_speaker_runs_without_a_voice_prompt_and_says_so(make_worker) -> None:
    import asyncio

    worker = make_worker(default_speaker="Zed")
    result = asyncio.run(worker.collect({"id": "j", "input": {"text": "Hi.", **FAST}}))
    assert result[0]["status"] == "completed"
    assert any("the default voice 'Zed' is not in the voices folder" in w for w in result[0]["warnings"])
    named = asyncio.run(worker.collect({"id": "j", "input": {"text": "Hi.", "speaker": "Zed", **FAST}}))
    assert "'speaker': unknown voice 'Zed'" in named["error"]  # a voice the job names must exist


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0])
def test_speed_scales_duration(run_job, speed: float) -> None:
    base = {"text": "Speed test.", "seed": 7, "output_format": "wav", "max_new_tokens": 12, "diffusion_steps": 3}
    item = only(run_job({**base, "speed": speed}))
    natural = 12 * 3200 / 24000
    assert item["duration_sec"] == pytest.approx(natural / speed, rel=0.03)
    assert probe(audio_bytes(item)).duration == pytest.approx(natural / speed, rel=0.03)
    assert item["segments"][-1]["end_sec"] == pytest.approx(item["duration_sec"], abs=2e-3)


@pytest.mark.parametrize("target", [-24.0, -16.0])
def test_loudness_of_the_result(run_job, target: float) -> None:
    item = only(run_job({"text": "Loudness.", "output_format": "wav", "target_lufs": target, "max_new_tokens": 10}))
    samples = decoded(item)
    assert item["loudness"]["applied"]
    assert abs(dsp.integrated_loudness(samples, 24000) - target) <= 1.0
    assert dsp.true_peak_dbtp(samples) <= -1.0 + 0.1


def test_normalize_false_leaves_the_level(run_job) -> None:
    item = only(run_job({"text": "Raw level.", "output_format": "wav", "normalize": False, "seed": 1, **FAST}))
    assert item["loudness"] == {**item["loudness"], "applied": False, "reason": "normalize is false"}


def test_same_seed_same_samples(run_job) -> None:
    job = {"text": "Determinism.", "output_format": "pcm_16", "seed": 2024, **FAST}
    first, second = only(run_job(job)), only(run_job(job))
    other = only(run_job({**job, "seed": 2025}))
    assert first["audio_base64"] == second["audio_base64"] and first["seed"] == 2024
    assert first["audio_base64"] != other["audio_base64"]
    random_a, random_b = only(run_job({**job, "seed": None})), only(run_job({**job, "seed": None}))
    assert random_a["seed"] != random_b["seed"]


def test_captions(run_job) -> None:
    job = {"text": "Speaker 1: The first line is here.\nSpeaker 2: And a second line.", "speakers": ["Alice", "Frank"],
           "max_chunk_chars": 40, **FAST}  # fmt: skip
    srt = only(run_job({**job, "captions": "srt"}))
    assert srt["captions"] == (
        "1\n00:00:00,000 --> 00:00:00,533\nThe first line is here.\n\n"
        "2\n00:00:00,683 --> 00:00:01,217\nAnd a second line.\n"
    )  # 4 frames of 133 ms each, with the 150 ms gap between chunks
    vtt = only(run_job({**job, "captions": "vtt"}))
    assert vtt["captions"].startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.533\nThe first line is here.\n\n")
    grouped = only(run_job({**job, "max_chunk_chars": 300, "captions": "srt"}))
    assert "Speaker 1: The first line is here.\nSpeaker 2: And a second line." in grouped["captions"]
    assert "captions" not in only(run_job(job))


def test_progress_after_each_chunk_but_never_the_last(make_worker, run_job) -> None:
    """Two chunks of different lengths decode in one batch: the short one ends first ("chunk 1 of
    2 done"), and nothing is sent once the last chunk is done (the result follows at once)."""
    updates: list[str] = []
    worker = make_worker(progress=lambda job, message: updates.append(message))
    text = "Hi there, friend. This one is quite a bit longer, yes."  # frame caps 41 and 69
    item = only(run_job({"text": text, "max_chunk_chars": 40, "diffusion_steps": 2}, worker=worker))
    assert item["chunks"] == 2
    assert updates[0] == "0.3 s of audio generated, 0 of 2 chunks done"  # the first frame of each chunk
    finished = [update for update in updates if update.startswith("chunk ")]
    # Reported with the frame it ended on: 41 + 41 frames of 133 ms so far.
    assert finished == ["chunk 1 of 2 done, 10.9 s of audio generated"]
    assert not any("2 of 2" in update for update in updates)


def test_progress_when_audio_starts_then_by_time(make_worker, run_job) -> None:
    """The first update comes with the first decoded frames (one per chunk of the batch); later
    ones at most every PROGRESS_INTERVAL_SEC, so a short job sends just the one."""
    updates: list[str] = []
    worker = make_worker(progress=lambda job, message: updates.append(message))
    worker.engine.batch_size = 3
    try:
        item = only(run_job({"text": "One. " * 20 + "Two. " * 20, "max_chunk_chars": 40, **FAST}, worker=worker))
    finally:
        worker.engine.batch_size = 0
    total = item["chunks"]
    assert total > 3
    assert updates[0] == f"0.4 s of audio generated, 0 of {total} chunks done"  # 3 frames of 133 ms
    by_time = [update for update in updates if not update.startswith("chunk ")]
    assert len(by_time) <= 1 + item["timings"]["generate_sec"] / 2.0
    assert [update.split(",")[0] for update in updates if update.startswith("chunk ")] == ["chunk 3 of 5 done"]


def test_disable_prefill_generates_without_voices(run_job) -> None:
    item = only(run_job({"text": "No voice prompt.", "disable_prefill": True, "speaker": "Frank", **FAST}))
    assert item["status"] == "completed"
    assert "disable_prefill is set, so the given voices were not used." in item["warnings"]


def test_list_voices_without_the_model(make_worker) -> None:
    import asyncio

    worker = make_worker()
    worker.engine, engine = None, worker.engine  # listing must not touch the model
    try:
        result = asyncio.run(worker.collect({"id": "v", "input": {"action": "list_voices"}}))
    finally:
        worker.engine = engine
    voices = only(result)["voices"]
    assert [v["name"] for v in voices] == ["en-Alice_woman", "en-Frank_man"]
    assert all(v["sample_rate"] == 24000 and v["duration_sec"] == pytest.approx(4.0) for v in voices)


def test_s3_delivery_end_to_end(make_worker, run_job, s3_server) -> None:
    from jobs.storage import S3Storage

    worker = make_worker(**s3_server.settings_overrides())
    worker.storage = S3Storage(worker.settings)
    item = only(run_job({"text": "Uploaded.", "output_format": "flac", **FAST}, worker=worker))
    assert item["delivery"] == "url" and "audio_base64" not in item
    assert item["url_expires_in"] == 3600
    assert probe(audio_bytes(item)).codec == "flac"


def test_inline_limit_fails_clearly(make_worker, run_job) -> None:
    worker = make_worker(inline_limit_bytes=1000)
    result = run_job({"text": "Too big to inline.", "output_format": "wav", **FAST}, worker=worker)
    assert "over the 0.0 MB limit for base64 results" in result["error"]
