"""The delivered timeline: chunks, gaps and exact pauses, speed, and words placed in it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from jobs.timeline import (
    Layout,
    Placement,
    assemble,
    chunk_segments,
    chunk_words,
    pause_samples,
    sentence_segments,
    timing_warnings,
    word_cues,
)
from text.aligner import ChunkTiming, Sentence, Word
from text.script import chunk_script, parse_script

RATE = 24000


@dataclass
class Result:
    index: int
    audio: np.ndarray


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01).astype(np.float32)  # never exactly zero


def test_pauses_are_exact_silences_and_replace_the_gap():
    script = parse_script("[pause:250ms] One. [pause:1s] Two. Three. [pause:2s]")
    chunks = chunk_script(script, 6)  # "Two." and "Three." are chunks of their own, with a gap
    assert [chunk.pause_after_ms for chunk in chunks] == [1000, 0, 2000]
    results = [Result(0, tone(0.5)), Result(1, tone(0.4)), Result(2, tone(0.3))]
    gap = 3600
    signal, layout = assemble(chunks, results, gap, 1.0, script.lead_pause_ms)

    lead, first, pause, second, third, trail = 6000, 12000, 24000, 9600, 7200, 48000
    assert signal.size == lead + first + pause + second + gap + third + trail
    assert not signal[:lead].any()
    assert not signal[lead + first : lead + first + pause].any()
    assert signal[lead + first + pause] != 0  # the next chunk starts right after the pause
    assert not signal[-trail:].any()
    assert [(p.index, p.start_sec, p.end_sec) for p in layout.placements] == [
        (0, 0.25, 0.75),
        (1, 1.75, 2.15),
        (2, 2.3, 2.6),
    ]


def test_speed_stretches_speech_but_not_pauses():
    script = parse_script("One. [pause:1500ms] Two.")
    chunks = chunk_script(script, 300)
    results = [Result(0, tone(2.0)), Result(1, tone(2.0))]
    signal, layout = assemble(chunks, results, 3600, 2.0, 0)
    first, second = layout.placements
    assert first.scale == pytest.approx(0.5, abs=0.01)
    assert first.end_sec == pytest.approx(1.0, abs=0.02)
    assert second.start_sec - first.end_sec == pytest.approx(1.5, abs=1e-9)  # exact
    pause = signal[round(first.end_sec * RATE) : round(second.start_sec * RATE)]
    assert pause.size == pause_samples(1500) and not pause.any()


def test_provisional_placement_of_an_open_section():
    layout = Layout()
    layout.pause(pause_samples(500))
    layout.chunk(0, RATE)
    layout.gap(RATE // 2)
    layout.chunk(1, RATE)
    assert layout.provisional(1, 0.5) == Placement(1, 0.5 + 0.75, 0.5 + 1.25, 0.5)
    layout.end_section(RATE)
    assert layout.provisional(0, 1.0) == layout.placements[0]


def timing(method: str = "aligned") -> ChunkTiming:
    words = (Word("Hi,", 0.1, 0.3, 0, 0), Word("there.", 0.35, 0.8, 0, 0), Word("Bye.", 1.0, 1.4, 1, 1))
    sentences = (Sentence("Hi, there.", 0.1, 0.8, 0), Sentence("Bye.", 1.0, 1.4, 1))
    return ChunkTiming(words if method != "sentences" else (), sentences, method)


def test_words_and_sentences_are_placed_by_their_chunk():
    script = parse_script("Speaker 1: Hi, there.\nSpeaker 2: Bye.")
    placement = Placement(3, 10.0, 11.0, 0.5)
    assert chunk_words(script, timing(), placement) == [
        {"word": "Hi,", "start_sec": 10.05, "end_sec": 10.15, "speaker": "Speaker 1"},
        {"word": "there.", "start_sec": 10.175, "end_sec": 10.4, "speaker": "Speaker 1"},
        {"word": "Bye.", "start_sec": 10.5, "end_sec": 10.7, "speaker": "Speaker 2"},
    ]
    segments = sentence_segments(script, {3: timing()}, [placement])
    assert [(s["index"], s["chunk"], s["speaker"], s["text"], s["start_sec"], s["end_sec"]) for s in segments] == [
        (0, 3, "Speaker 1", "Hi, there.", 10.05, 10.4),
        (1, 3, "Speaker 2", "Bye.", 10.5, 10.7),
    ]


def test_chunk_segments_follow_the_placements():
    script = parse_script("Speaker 1: Hi.\nSpeaker 2: Yo.")
    chunks = chunk_script(script, 300)
    (segment,) = chunk_segments(script, chunks, [Placement(0, 0.5, 1.25, 1.0)])
    assert segment == {
        "index": 0,
        "speaker": "Speaker 1",
        "speakers": ["Speaker 1", "Speaker 2"],
        "text": "Speaker 1: Hi.\nSpeaker 2: Yo.",
        "start_sec": 0.5,
        "end_sec": 1.25,
    }


def test_word_cues_fall_back_to_sentences_and_warnings_say_why():
    script = parse_script("Hi, there. Bye.")
    placements = [Placement(0, 0.0, 2.0, 1.0), Placement(1, 3.0, 5.0, 1.0)]
    timings = {0: timing(), 1: timing("sentences")}
    cues = word_cues(script, timings, placements)
    assert [cue["text"] for cue in cues] == ["Hi,", "there.", "Bye.", "Hi, there.", "Bye."]
    assert cues[3] == {"text": "Hi, there.", "start_sec": 3.1, "end_sec": 3.8}
    timings[2] = timing("estimated")
    warnings = timing_warnings(timings, "word")
    assert warnings[0].startswith("timestamps of chunk(s) 2 are estimated")
    assert warnings[1].startswith("chunk(s) 1 have sentence-level timestamps only (no words)")
