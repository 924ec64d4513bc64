"""Text handling: VibeVoice scripts (`Speaker N: ...` lines), sentence splitting and chunking.

A job's text is either plain text (one speaker) or a script with one turn per line. Long texts are
cut into chunks that the model generates one after another (or as a batch): long turns split at
sentence boundaries, short consecutive turns grouped up to the chunk limit. Every chunk keeps its
turns' speakers, so its prompt can carry each of their reference voices.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

MAX_SPEAKERS = 4

_LABEL = re.compile(r"^\s*speaker\s*(\d+)\s*:\s*(.*)$", re.IGNORECASE)
_LOOKS_LIKE_LABEL = re.compile(r"^\s*speaker\b[^:]{0,12}:", re.IGNORECASE)

# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "a.m",
        "p.m",
        "u.s",
        "u.k",
        "approx",
        "dept",
        "est",
        "fig",
        "inc",
        "ltd",
        "co",
        "corp",
        "no",
        "vol",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "gen",
        "col",
        "lt",
        "sgt",
        "capt",
        "rev",
        "hon",
    ]
)
_CLOSERS = "\"'”’)]}»"
_CJK_ENDS = "。！？；…"
_LATIN_ENDS = ".!?"


class ScriptError(ValueError):
    """The text is not a valid script; the message is one sentence for the user."""


@dataclass(frozen=True)
class Turn:
    """One line of a script: a 0-based model speaker index and what they say."""

    speaker: int
    text: str


@dataclass(frozen=True)
class Chunk:
    """A unit of generation: consecutive turns (possibly parts of one long turn)."""

    index: int
    turns: tuple[Turn, ...]

    @property
    def speakers(self) -> list[int]:
        """The speakers of this chunk in ascending order (their voices go into its prompt)."""
        return sorted({turn.speaker for turn in self.turns})

    @property
    def chars(self) -> int:
        return sum(len(turn.text) for turn in self.turns)


@dataclass(frozen=True)
class Script:
    turns: tuple[Turn, ...]
    is_script: bool  # False: plain text, one speaker
    label_base: int  # 1 when labels were written 1-4, 0 when 0-3

    @property
    def speakers(self) -> list[int]:
        return sorted({turn.speaker for turn in self.turns})

    def label(self, speaker: int) -> str:
        """The speaker's label as the user wrote it ("Speaker 1")."""
        return f"Speaker {speaker + self.label_base}"


def has_visible(text: str) -> bool:
    """True when the text has something to speak: more than whitespace and invisible format
    characters (zero-width spaces, joiners, byte-order marks, direction marks)."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def normalize_whitespace(text: str) -> str:
    return re.sub(r"[ \t\f\v\u00a0]+", " ", text).strip()


def parse_script(text: str) -> Script:
    """Plain text becomes one speaker; `Speaker N:` lines become turns with 0-based speakers.

    Labels may be written 0-3 or 1-4 (VibeVoice's own scripts use 1-based labels): when no line
    uses 0, labels are taken as 1-based.
    """
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    labelled = [_LABEL.match(line) for line in lines]
    if not any(labelled):
        for number, line in enumerate(lines, start=1):
            if _LOOKS_LIKE_LABEL.match(line):
                raise ScriptError(
                    f"text line {number} looks like a speaker label but is not 'Speaker N: ...' with N from 1 to 4."
                )
        plain = normalize_whitespace(" ".join(line.strip() for line in lines))
        return Script(turns=(Turn(0, plain),) if has_visible(plain) else (), is_script=False, label_base=1)

    turns: list[tuple[int, str]] = []
    for number, match in enumerate(labelled, start=1):
        if match is None:
            raise ScriptError(
                f"text line {number} has no 'Speaker N:' label; in a script every line must start with one."
            )
        spoken = normalize_whitespace(match.group(2))
        if not has_visible(spoken):
            raise ScriptError(f"text line {number} ('Speaker {match.group(1)}:') has nothing to say.")
        turns.append((int(match.group(1)), spoken))

    labels = {label for label, _ in turns}
    base = 0 if 0 in labels else 1
    if (base == 0 and max(labels) > MAX_SPEAKERS - 1) or (base == 1 and max(labels) > MAX_SPEAKERS):
        raise ScriptError(
            f"text uses 'Speaker {max(labels)}', but a script has at most {MAX_SPEAKERS} speakers, "
            "labelled 1 to 4 (or 0 to 3)."
        )
    return Script(
        turns=tuple(Turn(label - base, spoken) for label, spoken in turns),
        is_script=True,
        label_base=base,
    )


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the punctuation at text[end] closes a sentence (not an abbreviation or a decimal)."""
    char = text[end]
    if char in _CJK_ENDS:
        return True
    if char not in _LATIN_ENDS:
        return False
    after = end + 1
    while after < len(text) and text[after] in _CLOSERS:
        after += 1
    if after < len(text) and text[after] in _LATIN_ENDS + _CJK_ENDS:
        return False  # "?!" or "...": the run ends at its last mark
    if after < len(text) and not text[after].isspace():
        return False  # "3.14", "e.g.x", "example.com"
    if char == ".":
        word = re.search(r"([\w.]+)\.$", text[: end + 1])
        if word:
            token = word.group(1).lower()
            if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                return False  # "Dr. Smith", "J. R. R. Tolkien"
    return True


def split_sentences(text: str) -> list[str]:
    """Split at sentence ends, keeping the punctuation (and closing quotes) with the sentence."""
    sentences: list[str] = []
    start = 0
    index = 0
    while index < len(text):
        if _ends_sentence(text, index):
            end = index + 1
            while end < len(text) and text[end] in _CLOSERS:
                end += 1
            piece = text[start:end].strip()
            if piece:
                sentences.append(piece)
            start = index = end
            continue
        index += 1
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _join(left: str, right: str) -> str:
    """Join two pieces of text: with a space, except between CJK characters (which use none)."""
    if not left:
        return right
    if _is_cjk(left[-1]) or _is_cjk(right[0]):
        return left + right
    return f"{left} {right}"


def _is_cjk(char: str) -> bool:
    return "\u3000" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af" or "\uff00" <= char <= "\uffef"


def _split_long(sentence: str, limit: int) -> list[str]:
    """A sentence longer than the limit splits at clause marks, then at spaces, then anywhere."""
    for pattern in (r"(?<=[,;:，、；：])\s*", r"\s+"):
        parts = [part for part in re.split(pattern, sentence) if part]
        if len(parts) > 1:
            return _pack(parts, limit)
    return [sentence[i : i + limit] for i in range(0, len(sentence), limit)]


def _pack(pieces: list[str], limit: int) -> list[str]:
    """Greedy packing of pieces into strings of at most `limit` characters, balanced in size.

    The target size is the total divided evenly over the minimum number of parts, so a text a
    little over the limit becomes two halves instead of a full part and a tiny tail.
    """
    expanded: list[str] = []
    for piece in pieces:
        expanded.extend(_split_long(piece, limit) if len(piece) > limit else [piece])
    total = sum(len(piece) + 1 for piece in expanded)
    target = math.ceil(total / math.ceil(total / limit))
    packed: list[str] = []
    current = ""
    for piece in expanded:
        candidate = _join(current, piece)
        if current and (len(candidate) > limit or len(current) >= target):
            packed.append(current)
            current = piece
        else:
            current = candidate
    if current:
        packed.append(current)
    return packed


def chunk_script(script: Script, max_chars: int) -> list[Chunk]:
    """Cut a script into chunks of at most `max_chars` characters of spoken text.

    Long turns split at sentence boundaries (balanced sizes); short consecutive turns are grouped
    until the next one would exceed the limit.
    """
    pieces: list[Turn] = []
    for turn in script.turns:
        for part in _pack(split_sentences(turn.text), max_chars):
            pieces.append(Turn(turn.speaker, part))

    chunks: list[list[Turn]] = []
    size = 0
    for piece in pieces:
        if chunks and size + len(piece.text) <= max_chars:
            chunks[-1].append(piece)
            size += len(piece.text)
        else:
            chunks.append([piece])
            size = len(piece.text)
    return [Chunk(index=i, turns=tuple(turns)) for i, turns in enumerate(chunks)]


def max_frames_for(chunk: Chunk, frame_rate: float) -> int:
    """A cap on generated frames from the chunk's text length: the runaway guard.

    Read aloud, text runs at about 15 characters per second; the cap allows a third of that
    (5 chars/s) plus two seconds, so only a model that has stopped following the text reaches it.
    """
    seconds = 2.0 + chunk.chars / 5.0
    return max(1, math.ceil(seconds * frame_rate))
