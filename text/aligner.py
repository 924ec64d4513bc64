"""Word timings for generated speech: each chunk's audio force-aligned to the chunk's known text.

No recognition is needed: the words are known, only their times are not. PocketSphinx 5 aligns
them on the CPU with the US English acoustic model and CMU dictionary that ship inside its PyPI
wheel (nothing is downloaded at run time). Words missing from the dictionary get phones from
`pronounce`. Sentences whose script has no model (Chinese, say) get sentence-level timings from
the chunk's speech span, shared out by length. When the aligner cannot follow the audio (noise,
a model that skipped words) the words are estimated the same way, so every word always has a
time, in order, inside the chunk.

PocketSphinx holds the GIL while it decodes, so `Aligner` runs it in a process of its own: the
generation thread keeps decoding the next chunk meanwhile.

    python -m text.aligner   # the background process (Aligner starts it)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from text.pronounce import letters_only, pronounce
from text.script import split_sentences

log = logging.getLogger("vibevoice.aligner")

ALIGN_RATE = 16000  # the acoustic model's rate
FRAME_SEC = 0.01  # PocketSphinx's frame step
# Digital silence (exact zeros) makes the alignment search fail; a fixed noise floor this far
# below the speech level keeps the features finite without masking any speech.
NOISE_FLOOR_DB = -45.0
# A word does not start or end in silence: frames this far below the speech level are trimmed
# from a word's edges, and a silence of at least SILENT_RUN frames early in a word moves its start.
SILENCE_BELOW_PEAK_DB = 25.0
SILENT_RUN = 3
MIN_FRAMES = 10  # shorter audio is not aligned (its words are estimated)

Turn = tuple[int, str]  # (speaker, text), as a chunk's turns


@dataclass(frozen=True)
class Word:
    text: str  # as written, with its punctuation
    start: float  # seconds from the start of the chunk's audio
    end: float
    speaker: int
    sentence: int  # index into ChunkTiming.sentences


@dataclass(frozen=True)
class Sentence:
    text: str
    start: float
    end: float
    speaker: int


@dataclass(frozen=True)
class ChunkTiming:
    words: tuple[Word, ...]
    sentences: tuple[Sentence, ...]
    # "aligned"; "estimated": the aligner could not follow the audio, times shared out by length;
    # "sentences": no model for the language, sentence times only (no words).
    method: str
    seconds: float = 0.0  # time spent aligning


@dataclass(frozen=True)
class _Token:
    text: str  # as written
    key: str  # the dictionary key
    speaker: int
    sentence: int


def tokenize(turns: list[Turn]) -> tuple[list[_Token], list[tuple[str, int]]]:
    """Words (whitespace-separated, with at least one letter or digit; punctuation on its own
    joins the word before it) and sentences (text, speaker) of a chunk's turns."""
    tokens: list[_Token] = []
    sentences: list[tuple[str, int]] = []
    for speaker, text in turns:
        for sentence in split_sentences(text):
            sentences.append((sentence, speaker))
            pending = ""  # punctuation before the sentence's first word
            for piece in sentence.split():
                if not any(char.isalnum() for char in piece):
                    if tokens and tokens[-1].sentence == len(sentences) - 1:
                        last = tokens[-1]
                        tokens[-1] = _Token(f"{last.text} {piece}", last.key, last.speaker, last.sentence)
                    else:
                        pending += piece + " "
                    continue
                tokens.append(_Token(pending + piece, letters_only(piece), speaker, len(sentences) - 1))
                pending = ""
    return tokens, sentences


def has_model(sentence: str) -> bool:
    """Whether the English model can align the sentence: its letters are all Latin script."""
    letters = [char for char in sentence if char.isalpha()]
    return all(char.isascii() or unicodedata.name(char, "").startswith("LATIN") for char in letters)


# --- the alignment itself --------------------------------------------------------------------


class _Decoder:
    """One PocketSphinx decoder in alignment mode, kept for the life of the process."""

    def __init__(self) -> None:
        import pocketsphinx

        # Equal beams for frames, phones and words: unequal defaults make alignments fail to
        # reach the grammar's final state ("Final result does not match the grammar").
        self.decoder = pocketsphinx.Decoder(
            samprate=ALIGN_RATE, lm=None, loglevel="FATAL", beam=1e-48, pbeam=1e-48, wbeam=1e-48, bestpath=False
        )
        self.added: set[str] = set()

    def align(self, keys: list[str], pcm: bytes) -> list[tuple[int, int]] | None:
        """Each key's (first frame, frame after its last), or None when alignment fails."""
        names = []
        for key in keys:
            name = key if re.fullmatch(r"[\w']+", key) else re.sub(r"[^\w']", "_", key) or "_"
            if self.decoder.lookup_word(name) is None and name not in self.added:
                self.decoder.add_word(name, pronounce(key, self.decoder.lookup_word), False)
                self.added.add(name)
            names.append(name)
        self.decoder.set_align_text(" ".join(names))
        self.decoder.start_utt()
        try:
            self.decoder.process_raw(pcm, full_utt=True)
        finally:
            self.decoder.end_utt()
        spans = [
            (segment.start_frame, segment.end_frame + 1)
            for segment in self.decoder.seg() or []
            if not segment.word.startswith(("<", "["))
        ]
        return spans if len(spans) == len(keys) else None


_decoder: _Decoder | None = None


def _frame_levels(pcm16: np.ndarray) -> np.ndarray:
    """Energy in dB of each 10 ms frame."""
    step = round(ALIGN_RATE * FRAME_SEC)
    count = pcm16.size // step
    frames = pcm16[: count * step].reshape(count, step).astype(np.float64)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-3)


def _to_pcm16(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The aligner's input: 16 kHz int16 with a fixed, seeded noise floor under the speech."""
    samples = resample_poly(audio.astype(np.float64), ALIGN_RATE, sample_rate) if sample_rate != ALIGN_RATE else audio
    level = float(np.percentile(np.abs(samples), 99)) if samples.size else 0.0
    floor = max(level, 1e-3) * 10 ** (NOISE_FLOOR_DB / 20)
    samples = samples + np.random.default_rng(0).normal(0.0, floor, samples.size)
    return (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)


def _speech_threshold(levels: np.ndarray) -> float:
    floor, peak = np.percentile(levels, 10), np.percentile(levels, 95)
    return max(floor + 0.25 * (peak - floor), peak - SILENCE_BELOW_PEAK_DB)


def _refine(spans: list[tuple[int, int]], levels: np.ndarray) -> list[tuple[int, int]]:
    """Move word edges out of silence (the acoustic model tends to start a word in the pause
    before it)."""
    threshold = _speech_threshold(levels)
    silent = levels < threshold
    count = levels.size
    refined = []
    for start, end in spans:
        while start < min(end, count) - SILENT_RUN and silent[start]:
            start += 1
        run = 0
        for frame in range(start, min(start + max(SILENT_RUN, (end - start) * 2 // 5), start + 20, count - 1)):
            run = run + 1 if silent[frame] else 0
            if run >= SILENT_RUN and not silent[frame + 1]:
                start = frame + 1
        while end > start + SILENT_RUN and end - 1 < count and silent[end - 1]:
            end -= 1
        refined.append((start, end))
    return refined


def _shares(weights: list[float], start: float, end: float) -> list[tuple[float, float]]:
    """Split [start, end] into consecutive spans proportional to the weights."""
    total = sum(weights) or 1.0
    spans, position = [], start
    for weight in weights:
        span_end = position + (end - start) * weight / total
        spans.append((position, span_end))
        position = span_end
    return spans


def _speech_span(levels: np.ndarray, duration: float) -> tuple[float, float]:
    """First and last moment above the speech threshold (the whole chunk if nothing is)."""
    if levels.size == 0:
        return 0.0, duration
    loud = np.nonzero(levels >= _speech_threshold(levels))[0]
    if loud.size == 0:
        return 0.0, duration
    return float(loud[0] * FRAME_SEC), min(duration, float((loud[-1] + 1) * FRAME_SEC))


def align_chunk(turns: list[Turn], audio: np.ndarray, sample_rate: int) -> ChunkTiming:
    """Word and sentence timings for one chunk's audio (mono float32)."""
    global _decoder
    started = time.perf_counter()
    tokens, sentences = tokenize(turns)
    duration = audio.size / sample_rate
    pcm16 = _to_pcm16(audio, sample_rate)
    levels = _frame_levels(pcm16)
    method = "aligned" if all(has_model(text) for text, _ in sentences) else "sentences"
    spans_sec: list[tuple[float, float]] | None = None
    if method == "aligned" and tokens:
        frames = None
        if levels.size >= MIN_FRAMES:
            try:
                _decoder = _decoder or _Decoder()
                frames = _decoder.align([token.key for token in tokens], pcm16.tobytes())
            except (RuntimeError, ValueError, IndexError) as exc:  # the search failed: estimate instead
                log.debug("alignment failed: %s", exc)
                _decoder = None  # a decoder left mid-utterance is not reused
        if frames is not None:
            spans_sec = [(start * FRAME_SEC, end * FRAME_SEC) for start, end in _refine(frames, levels)]
        else:
            method = "estimated"
    start, end = _speech_span(levels, duration)
    if method == "sentences":
        return _sentence_timing(sentences, start, end, time.perf_counter() - started)
    if spans_sec is None:
        spans_sec = _shares([len(token.key) + 1.0 for token in tokens], start, end)
    words = _words(tokens, spans_sec, duration)
    return ChunkTiming(words, _sentences_of(words, sentences), method, time.perf_counter() - started)


def _words(tokens: list[_Token], spans: list[tuple[float, float]], duration: float) -> tuple[Word, ...]:
    """Words with their spans, clamped into the chunk and kept in order."""
    words = []
    previous_end = 0.0
    for token, (start, end) in zip(tokens, spans, strict=True):
        start = min(max(start, previous_end), duration)
        end = min(max(end, start), duration)
        words.append(Word(token.text, round(start, 3), round(end, 3), token.speaker, token.sentence))
        previous_end = end
    return tuple(words)


def _sentences_of(words: tuple[Word, ...], sentences: list[tuple[str, int]]) -> tuple[Sentence, ...]:
    """Each sentence runs from its first word's start to its last word's end."""
    result = []
    for number, (text, speaker) in enumerate(sentences):
        own = [word for word in words if word.sentence == number]
        if own:
            result.append(Sentence(text, own[0].start, own[-1].end, speaker))
        else:  # nothing to say in it (punctuation only): an instant where the previous one ended
            moment = result[-1].end if result else 0.0
            result.append(Sentence(text, moment, moment, speaker))
    return tuple(result)


def _sentence_timing(sentences: list[tuple[str, int]], start: float, end: float, seconds: float) -> ChunkTiming:
    spans = _shares([len(text) + 1.0 for text, _ in sentences], start, end)
    return ChunkTiming(
        words=(),
        sentences=tuple(
            Sentence(text, round(a, 3), round(b, 3), speaker)
            for (text, speaker), (a, b) in zip(sentences, spans, strict=True)
        ),
        method="sentences",
        seconds=seconds,
    )


def estimate_chunk(turns: list[Turn], audio: np.ndarray, sample_rate: int) -> ChunkTiming:
    """Timings shared out by length over the chunk's speech span, without the aligner."""
    tokens, sentences = tokenize(turns)
    duration = audio.size / sample_rate
    start, end = _speech_span(_frame_levels(_to_pcm16(audio, sample_rate)), duration)
    if not all(has_model(text) for text, _ in sentences):
        return _sentence_timing(sentences, start, end, 0.0)
    words = _words(tokens, _shares([len(token.key) + 1.0 for token in tokens], start, end), duration)
    return ChunkTiming(words, _sentences_of(words, sentences), "estimated")


# --- the background process --------------------------------------------------------------------

# How long a chunk's alignment may take, beyond this many times its audio's length, before the
# process is presumed stuck, stopped, and the chunk's words estimated (alignment runs at about
# 1-3% of real time; the allowance also covers the chunks queued before it and a process start).
ALIGN_TIMEOUT_SEC = 60.0
ALIGN_TIMEOUT_PER_AUDIO_SEC = 1.0
ALIGNER_NICENESS = 10


def default_processes() -> int:
    """Aligner processes: one per four CPU cores, from one to four (a GPU host has cores to spare;
    chunks of one batch finish together and are aligned side by side)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class Aligner:
    """Aligns chunks in background processes (`python -m text.aligner`), started on first use and kept
    for the next jobs; each is fed one request at a time by its own thread, from one queue.

    `submit` returns at once, so the generation thread hands each finished chunk over and goes
    on with the next. A failure of a process (killed, stuck, out of memory) costs no job: the
    chunk's words are then estimated here, and the next request starts a new process. Plain
    subprocesses rather than multiprocessing: a spawned child would first import the parent's
    main module (the worker, with torch).
    """

    def __init__(self, sample_rate: int, processes: int = 1):
        self.sample_rate = sample_rate
        self.processes = processes
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._feeders: list[threading.Thread] = []
        self._children: dict[int, subprocess.Popen] = {}  # feeder slot -> its process

    def submit(self, turns: list[Turn], audio: np.ndarray) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self._feeders:
                for slot in range(self.processes):
                    feeder = threading.Thread(target=self._feed, args=(slot,), name=f"aligner-{slot}", daemon=True)
                    feeder.start()
                    self._feeders.append(feeder)
        self._requests.put((future, turns, audio))
        return future

    def result(self, future: concurrent.futures.Future, turns: list[Turn], audio: np.ndarray) -> ChunkTiming:
        """The alignment, or an estimate if the process failed or took too long."""
        timeout = ALIGN_TIMEOUT_SEC + ALIGN_TIMEOUT_PER_AUDIO_SEC * audio.size / self.sample_rate
        try:
            return future.result(timeout=timeout)
        except Exception as exc:  # the process died, hung or raised: estimate instead
            log.warning("aligner failed (%s: %s); word timings estimated", type(exc).__name__, exc)
            if isinstance(exc, concurrent.futures.TimeoutError):
                for slot in list(self._children):
                    self._stop(slot)
            return estimate_chunk(turns, audio, self.sample_rate)

    def close(self) -> None:
        with self._lock:
            feeders, self._feeders = self._feeders, []
        for _ in feeders:
            self._requests.put(None)
        for feeder in feeders:
            feeder.join(timeout=10)
        for slot in list(self._children):
            self._stop(slot)

    def _feed(self, slot: int) -> None:
        while (request := self._requests.get()) is not None:
            future, turns, audio = request
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._ask(slot, turns, audio))
            except Exception as exc:
                self._stop(slot)
                future.set_exception(exc)

    def _ask(self, slot: int, turns: list[Turn], audio: np.ndarray) -> ChunkTiming:
        process = self._children.get(slot)
        if process is None or process.poll() is not None:
            process = self._children[slot] = subprocess.Popen(
                [sys.executable, "-m", "text.aligner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,  # the repository root: `text` imports from there
            )
        assert process.stdin is not None and process.stdout is not None
        pickle.dump((turns, audio, self.sample_rate), process.stdin)
        process.stdin.flush()
        return pickle.load(process.stdout)

    def _stop(self, slot: int) -> None:
        process = self._children.pop(slot, None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def serve() -> None:
    """The background process: (turns, audio, rate) in on stdin, ChunkTiming out on stdout, until
    stdin closes. Anything a library prints goes to stderr, away from the answers. It runs at a
    lower CPU priority than the worker."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    with contextlib.suppress(OSError):
        os.nice(ALIGNER_NICENESS)  # where CPU is short, the decode loop goes first
    requests = sys.stdin.buffer
    while True:
        try:
            turns, audio, rate = pickle.load(requests)
        except (EOFError, pickle.UnpicklingError):  # the worker has gone
            return
        try:
            timing = align_chunk(turns, audio, rate)
        except Exception as exc:  # the parent estimates this chunk; the process goes on
            log.warning("alignment raised %s: %s", type(exc).__name__, exc)
            timing = estimate_chunk(turns, audio, rate)
        pickle.dump(timing, answers)
        answers.flush()


_shared: Aligner | None = None


def shared_aligner() -> Aligner:
    """The process's aligner (its background process starts with the first job that needs it)."""
    global _shared
    if _shared is None:
        from config import MODEL_SAMPLE_RATE

        _shared = Aligner(MODEL_SAMPLE_RATE, default_processes())
    return _shared


if __name__ == "__main__":  # through the module's own name, so the answers unpickle as text.aligner.ChunkTiming
    from text import aligner

    aligner.serve()
