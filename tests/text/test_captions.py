"""Captions: SRT and WebVTT built from a job's segments, one cue per segment."""

from __future__ import annotations

import pytest

from text import captions

SEGMENTS = [
    {"start_sec": 0.0, "end_sec": 1.5, "text": "Hello there."},
    {"start_sec": 1.65, "end_sec": 3723.0456, "text": "Speaker 1: One line.\n\nSpeaker 2: Another --> line."},
]


def test_srt_numbers_its_cues_and_uses_commas() -> None:
    assert captions.build(SEGMENTS, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
        "2\n00:00:01,650 --> 01:02:03,046\nSpeaker 1: One line.\nSpeaker 2: Another -> line.\n"
    )


def test_vtt_has_its_header_and_uses_dots() -> None:
    assert captions.build(SEGMENTS, "vtt") == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.500\nHello there.\n\n"
        "00:00:01.650 --> 01:02:03.046\nSpeaker 1: One line.\nSpeaker 2: Another -> line.\n"
    )


def test_blank_lines_inside_a_cue_are_dropped() -> None:
    # A blank line would end the cue early in both formats.
    [cue] = captions.build([{"start_sec": 0, "end_sec": 1, "text": "a\n \n\nb"}], "srt").split("\n\n")
    assert cue.endswith("a\nb\n")


def test_no_segments_give_empty_but_valid_files() -> None:
    assert captions.build([], "srt") == ""
    assert captions.build([], "vtt") == "WEBVTT\n\n"


def test_negative_times_clamp_to_zero() -> None:
    cue = captions.build([{"start_sec": -0.2, "end_sec": 0.001, "text": "x"}], "srt")
    assert "00:00:00,000 --> 00:00:00,001" in cue


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown caption kind 'ass'"):
        captions.build(SEGMENTS, "ass")
