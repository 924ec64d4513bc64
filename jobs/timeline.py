"""Where everything lies in the delivered audio: chunks, pauses, sentences and words.

The delivered audio is built from sections: runs of chunks with the chunk gap between them,
time-stretched together by the job's speed. Between sections (and before the first or after the
last) stand the silences that pause tags ask for, added after the speed change so they keep
their exact length. Both renderers record the same `Layout` while they build the audio, so a
whole file and a stream report the same times; resampling to the output rate keeps times as
they are.

Segments come at chunk granularity, or at sentence granularity when the job asked for
timestamps; words (`"timestamps": "word"`) come from the aligner's per-chunk timings, placed by
their chunk's start and its section's speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from audio import dsp
from config import MODEL_SAMPLE_RATE
from text import captions
from text.aligner import ChunkTiming
from text.script import Chunk, Script


class ChunkResult(Protocol):
    index: int
    audio: np.ndarray  # at the model's rate


@dataclass(frozen=True)
class Placement:
    """A chunk's place in the delivered audio."""

    index: int
    start_sec: float
    end_sec: float
    scale: float  # delivered seconds per second of the chunk's own audio (1 / speed, as measured)


def pause_samples(milliseconds: int) -> int:
    """A pause at the model's rate (24 samples a millisecond: exact at every output rate)."""
    return round(milliseconds * MODEL_SAMPLE_RATE / 1000)


@dataclass
class Layout:
    """Records the delivered timeline as a renderer builds it, in samples at the model's rate.

    Calls come in timeline order: `chunk` and `gap` within a section, `end_section` with the
    section's length after the speed change, `pause` between sections.
    """

    placements: list[Placement] = field(default_factory=list)
    position: int = 0  # delivered samples before the open section
    _joined: int = 0  # samples of the open section before the speed change
    _open: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk index, start, end) in the section

    def chunk(self, index: int, samples: int) -> None:
        self._open.append((index, self._joined, self._joined + samples))
        self._joined += samples

    def gap(self, samples: int) -> None:
        self._joined += samples

    def end_section(self, stretched: int) -> None:
        scale = stretched / self._joined if self._joined else 1.0
        for index, start, end in self._open:
            self.placements.append(Placement(index, self._at(start, scale), self._at(end, scale), scale))
        self.position += stretched
        self._joined, self._open = 0, []

    def pause(self, samples: int) -> None:
        self.position += samples

    def provisional(self, index: int, scale: float) -> Placement | None:
        """A chunk of the open section, placed with the speed ratio measured so far (streamed
        items; the final placement comes with `end_section`)."""
        for own, start, end in self._open:
            if own == index:
                return Placement(index, self._at(start, scale), self._at(end, scale), scale)
        return next((placement for placement in self.placements if placement.index == index), None)

    def _at(self, joined_samples: int, scale: float) -> float:
        return (self.position + joined_samples * scale) / MODEL_SAMPLE_RATE


def assemble(
    chunks: list[Chunk], results: Sequence[ChunkResult], gap: int, speed: float, lead_pause_ms: int
) -> tuple[np.ndarray, Layout]:
    """The delivered signal at the model's rate, before loudness and resampling, and its layout:
    each section's chunks joined with `gap` silent samples and time-stretched together; the
    pauses, exact, between sections."""
    layout = Layout()
    pause_after = {chunk.index: chunk.pause_after_ms for chunk in chunks}
    out: list[np.ndarray] = []
    section: list[np.ndarray] = []

    def end_section() -> None:
        joined = np.concatenate(section) if section else np.zeros(0, dtype=np.float32)
        stretched = dsp.change_speed(joined.astype(np.float32, copy=False), MODEL_SAMPLE_RATE, speed)
        layout.end_section(stretched.size)
        out.append(stretched)
        section.clear()

    def pause(milliseconds: int) -> None:
        samples = pause_samples(milliseconds)
        layout.pause(samples)
        out.append(np.zeros(samples, dtype=np.float32))

    if lead_pause_ms:
        pause(lead_pause_ms)
    for result in results:
        if section:  # a chunk after a pause opens a new section, without a gap
            layout.gap(gap)
            section.append(np.zeros(gap, dtype=np.float32))
        layout.chunk(result.index, result.audio.size)
        section.append(result.audio)
        if pause_after.get(result.index):
            end_section()
            pause(pause_after[result.index])
    if section:
        end_section()
    return _join(out), layout


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    """The pieces as one float32 array, each freed once copied (and one piece as it is), so a long
    job's signal never exists twice over: `render` holds the chunks' audio too."""
    if len(pieces) == 1:
        return pieces.pop().astype(np.float32, copy=False)
    signal = np.empty(sum(piece.size for piece in pieces), dtype=np.float32)
    at = 0
    while pieces:
        piece = pieces.pop(0)
        signal[at : at + piece.size] = piece
        at += piece.size
    return signal


def seconds(value: float) -> float:
    """Rounded to the millisecond, halves up."""
    return math.floor(value * 1000 + 0.5) / 1000


# --- result fields ---------------------------------------------------------------------------


def chunk_segments(script: Script, chunks: list[Chunk], placements: list[Placement]) -> list[dict]:
    """One segment per chunk: its speakers, its text and where it lies in the delivered audio."""
    by_index = {chunk.index: chunk for chunk in chunks}
    segments = []
    for placement in placements:
        chunk = by_index[placement.index]
        if len(chunk.turns) == 1:
            spoken = chunk.turns[0].text
        else:
            spoken = "\n".join(f"{script.label(turn.speaker)}: {turn.text}" for turn in chunk.turns)
        segments.append(
            {
                "index": chunk.index,
                "speaker": script.label(chunk.turns[0].speaker),
                "speakers": [script.label(speaker) for speaker in chunk.speakers],
                "text": spoken,
                "start_sec": seconds(placement.start_sec),
                "end_sec": seconds(placement.end_sec),
            }
        )
    return segments


def sentence_segments(script: Script, timings: dict[int, ChunkTiming], placements: list[Placement]) -> list[dict]:
    """One segment per sentence, timed by the aligner, in the delivered audio."""
    segments = []
    for placement in placements:
        for sentence in timings[placement.index].sentences:
            segments.append(
                {
                    "index": len(segments),
                    "chunk": placement.index,
                    "speaker": script.label(sentence.speaker),
                    "speakers": [script.label(sentence.speaker)],
                    "text": sentence.text,
                    "start_sec": _placed(sentence.start, placement),
                    "end_sec": _placed(sentence.end, placement),
                }
            )
    return segments


def chunk_words(script: Script, timing: ChunkTiming, placement: Placement) -> list[dict]:
    """A chunk's words in the delivered audio."""
    return [
        {
            "word": word.text,
            "start_sec": _placed(word.start, placement),
            "end_sec": _placed(word.end, placement),
            "speaker": script.label(word.speaker),
        }
        for word in timing.words
    ]


def words(script: Script, timings: dict[int, ChunkTiming], placements: list[Placement]) -> list[dict]:
    return [word for placement in placements for word in chunk_words(script, timings[placement.index], placement)]


def word_cues(script: Script, timings: dict[int, ChunkTiming], placements: list[Placement]) -> list[dict]:
    """Caption cues one word each; a chunk without words (no model for its language) gives its
    sentences instead."""
    cues = []
    for placement in placements:
        timing = timings[placement.index]
        if timing.words:
            cues += [{"text": w["word"], **_span(w)} for w in chunk_words(script, timing, placement)]
        else:
            cues += [
                {"text": s.text, "start_sec": _placed(s.start, placement), "end_sec": _placed(s.end, placement)}
                for s in timing.sentences
            ]
    return cues


def timing_warnings(timings: dict[int, ChunkTiming], wanted: str) -> list[str]:
    """What the job should know about timings that are not word-accurate."""
    warnings = []
    estimated = sorted(index for index, timing in timings.items() if timing.method == "estimated")
    sentences_only = sorted(index for index, timing in timings.items() if timing.method == "sentences")
    if estimated:
        warnings.append(
            f"timestamps of chunk(s) {', '.join(map(str, estimated))} are estimated from the text's length: "
            "the aligner could not follow the audio."
        )
    if sentences_only:
        what = "have sentence-level timestamps only (no words)" if wanted == "word" else "are estimated"
        warnings.append(
            f"chunk(s) {', '.join(map(str, sentences_only))} {what}: word alignment has a model for English only, "
            "so their sentences are timed from the chunk's timing and their length."
        )
    return warnings


def _placed(chunk_seconds: float, placement: Placement) -> float:
    return seconds(min(placement.start_sec + chunk_seconds * placement.scale, placement.end_sec))


def _span(entry: dict) -> dict:
    return {"start_sec": entry["start_sec"], "end_sec": entry["end_sec"]}


# --- one job's timestamps ------------------------------------------------------------------------


class JobTimestamps:
    """A job's alignments: each finished chunk goes to the aligner while the next one decodes;
    the result fields (segments, words, captions) are built from them and the placements.

    `timestamps` is the job's "none" | "sentence" | "word"; `caption_unit` its "chunk" |
    "sentence" | "word" (or None without captions). Chunks are aligned when either needs more
    than chunk granularity.
    """

    def __init__(self, aligner, script: Script, chunks: list[Chunk], timestamps: str, caption_unit: str | None):
        self.aligner = aligner
        self.script = script
        self.turns = {chunk.index: [(turn.speaker, turn.text) for turn in chunk.turns] for chunk in chunks}
        self.chunks = chunks
        self.timestamps = timestamps
        self.caption_unit = caption_unit
        self.enabled = timestamps != "none" or caption_unit in ("sentence", "word")
        self._pending: dict[int, tuple[object, np.ndarray]] = {}  # chunk index -> (future, audio)
        self._done: dict[int, ChunkTiming] = {}
        self._handed_out: set[int] = set()
        self.wait_seconds = 0.0

    @classmethod
    def for_plan(cls, aligner, plan) -> JobTimestamps:
        """A planned job's (planning.JobPlan) timestamps; `aligner` may be None when it asks for none."""
        return cls(aligner, plan.script, plan.chunks, plan.timestamps, plan.caption_unit)

    def chunk_done(self, result: ChunkResult) -> None:
        """From the generation thread, as each chunk is finished (in chunk order)."""
        if self.enabled:
            self._pending[result.index] = (self.aligner.submit(self.turns[result.index], result.audio), result.audio)

    def ready_words(self, layout: Layout, scale: float) -> list[dict]:
        """Streamed jobs: the words of chunks aligned since the last call, in chunk order, placed
        with the layout as it stands (the open section's speed ratio as measured so far)."""
        if self.timestamps != "word":
            return []
        words: list[dict] = []
        for index in sorted(self._pending):
            future, _ = self._pending[index]
            if index in self._handed_out:
                continue
            if not future.done():
                break
            placement = layout.provisional(index, scale)
            if placement is None:
                break
            words += chunk_words(self.script, self._timing(index), placement)
            self._handed_out.add(index)
        return words

    def fields(self, placements: list[Placement], captions_kind: str | None) -> dict:
        """`segments`, and `words` and `captions` when asked for, plus `warnings` about timings."""
        started = time.perf_counter()
        timings = {placement.index: self._timing(placement.index) for placement in placements} if self.enabled else {}
        self.wait_seconds += time.perf_counter() - started
        fields: dict = {}
        if self.timestamps == "none":
            fields["segments"] = chunk_segments(self.script, self.chunks, placements)
        else:
            fields["segments"] = sentence_segments(self.script, timings, placements)
        if self.timestamps == "word":
            fields["words"] = words(self.script, timings, placements)
        if captions_kind:
            if self.caption_unit == "word":
                cues = word_cues(self.script, timings, placements)
            elif self.caption_unit == "sentence":
                cues = sentence_segments(self.script, timings, placements)
            else:
                cues = chunk_segments(self.script, self.chunks, placements)
            fields["captions"] = captions.build(cues, captions_kind)
        fields["warnings"] = timing_warnings(timings, self.timestamps) if self.enabled else []
        fields["align_sec"] = sum(timing.seconds for timing in timings.values()) if self.enabled else None
        fields["align_wait_sec"] = self.wait_seconds if self.enabled else None
        return fields

    def _timing(self, index: int) -> ChunkTiming:
        if index not in self._done:
            future, audio_samples = self._pending[index]
            self._done[index] = self.aligner.result(future, self.turns[index], audio_samples)
        return self._done[index]
