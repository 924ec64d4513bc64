"""Text handling: VibeVoice scripts (`Speaker N: ...` lines), sentence splitting and chunking.

A job's text is either plain text (one speaker) or a script with one turn per line. Pause tags
(`[pause]`, `[pause:750ms]`, `[pause:2s]`) may stand anywhere: the text splits there, and the
turn before the tag carries the pause that follows it. Long texts are cut into chunks that the
model generates one after another (or as a batch): long turns split at sentence boundaries,
short consecutive turns grouped up to the chunk limit, and a pause ends its chunk. Every chunk
keeps its turns' speakers, so its prompt can carry each of their reference voices.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, replace

MAX_SPEAKERS = 4
PAUSE_DEFAULT_MS = 500  # a bare [pause]
PAUSE_MAX_MS = 10_000  # one tag

# Anything that starts like a pause tag; `_PAUSE` is the valid form ("[pause:1500]" is milliseconds,
# as in ComfyUI's VibeVoice nodes). Other square brackets are text.
_PAUSE_LIKE = re.compile(r"\[\s*pause\b[^\]\[\n]*\]?", re.IGNORECASE)
_PAUSE = re.compile(r"\[\s*pause\s*(?::\s*(\d{1,6}(?:\.\d{1,3})?)\s*(ms|s)?\s*)?\]", re.IGNORECASE)
_LEADING_PAUSES = re.compile(rf"(?:\s*{_PAUSE_LIKE.pattern})+\s*", re.IGNORECASE)

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
    """One line of a script (or its part up to a pause tag): a 0-based model speaker index, what
    they say, and the silence that follows it."""

    speaker: int
    text: str
    pause_after_ms: int = 0


@dataclass(frozen=True)
class Chunk:
    """A unit of generation: consecutive turns (possibly parts of one long turn)."""

    index: int
    turns: tuple[Turn, ...]
    pause_after_ms: int = 0  # silence after this chunk, in place of the gap between chunks

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
    lead_pause_ms: int = 0  # pause tags before the first words

    @property
    def pause_ms(self) -> int:
        """All pauses the tags ask for."""
        return self.lead_pause_ms + sum(turn.pause_after_ms for turn in self.turns)

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


def parse_pauses(text: str) -> list[tuple[str, int]]:
    """The text between pause tags, each piece with the pause (ms) that follows it.

    The first piece may be empty (the text starts with a tag). A tag that is not a valid pause
    raises ScriptError naming it.
    """
    pieces: list[tuple[str, int]] = []
    position = 0
    for match in _PAUSE_LIKE.finditer(text):
        pieces.append((text[position : match.start()], _pause_ms(match.group(0))))
        position = match.end()
    pieces.append((text[position:], 0))
    merged: list[tuple[str, int]] = []
    for piece, pause in pieces:  # pieces with nothing to say add their pause to the one before
        if merged and not has_visible(piece):
            merged[-1] = (merged[-1][0], merged[-1][1] + pause)
        else:
            merged.append((normalize_whitespace(piece) if has_visible(piece) else "", pause))
    return merged


def _pause_ms(tag: str) -> int:
    match = _PAUSE.fullmatch(tag)
    if match is None:
        shown = tag if len(tag) <= 40 else tag[:37] + "..."
        raise ScriptError(
            f"has a malformed pause tag '{shown}'; write [pause], [pause:750ms] or [pause:2s] "
            f"(at most {PAUSE_MAX_MS // 1000} s each)."
        )
    if match.group(1) is None:
        return PAUSE_DEFAULT_MS
    value = float(match.group(1)) * (1000 if (match.group(2) or "ms").lower() == "s" else 1)
    if value > PAUSE_MAX_MS:
        raise ScriptError(f"has the pause tag '{tag}', longer than {PAUSE_MAX_MS // 1000} s; the limit is per tag.")
    return round(value)


def _add_spoken(turns: list[Turn], speaker: int, spoken: str, lead: int) -> int:
    """Append a line's turns (split at its pause tags); returns the lead pause, grown by any
    pause that comes before the first words of the text."""
    for piece, pause in parse_pauses(spoken):
        if piece:
            turns.append(Turn(speaker, piece, pause))
        elif turns:
            turns[-1] = replace(turns[-1], pause_after_ms=turns[-1].pause_after_ms + pause)
        else:
            lead += pause
    return lead


def _leading_pauses(line: str) -> tuple[str, str]:
    """A script line's pause tags before its label (or the whole line of tags), and the rest."""
    match = _LEADING_PAUSES.match(line)
    return (match.group(0), line[match.end() :]) if match else ("", line)


def parse_script(text: str) -> Script:
    """Plain text becomes one speaker; `Speaker N:` lines become turns with 0-based speakers.

    Labels may be written 0-3 or 1-4 (VibeVoice's own scripts use 1-based labels): when no line
    uses 0, labels are taken as 1-based. In a script, pause tags may stand before a line's label,
    and a line of pause tags alone needs none.
    """
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    split = [_leading_pauses(line) for line in lines]
    labelled = [_LABEL.match(rest) for _, rest in split]
    if not any(labelled):
        for number, line in enumerate(lines, start=1):
            if _LOOKS_LIKE_LABEL.match(line):
                raise ScriptError(
                    f"text line {number} looks like a speaker label but is not 'Speaker N: ...' with N from 1 to 4."
                )
        plain_turns: list[Turn] = []
        lead = _add_spoken(plain_turns, 0, " ".join(line.strip() for line in lines), 0)
        return Script(turns=tuple(plain_turns), is_script=False, label_base=1, lead_pause_ms=lead)

    found: list[tuple[int, str]] = []  # (label, spoken); label -1: pause tags before a label or alone
    for number, ((tags, rest), match) in enumerate(zip(split, labelled, strict=True), start=1):
        if tags:
            found.append((-1, tags))
        if match is None:
            if not rest.strip():
                continue
            raise ScriptError(
                f"text line {number} has no 'Speaker N:' label; in a script every line must start with one."
            )
        spoken = normalize_whitespace(match.group(2))
        if not has_visible(spoken):
            raise ScriptError(f"text line {number} ('Speaker {match.group(1)}:') has nothing to say.")
        found.append((int(match.group(1)), spoken))

    labels = {label for label, _ in found if label >= 0}
    base = 0 if 0 in labels else 1
    if (base == 0 and max(labels) > MAX_SPEAKERS - 1) or (base == 1 and max(labels) > MAX_SPEAKERS):
        raise ScriptError(
            f"text uses 'Speaker {max(labels)}', but a script has at most {MAX_SPEAKERS} speakers, "
            "labelled 1 to 4 (or 0 to 3)."
        )
    turns: list[Turn] = []
    lead = 0
    for label, spoken in found:
        lead = _add_spoken(turns, max(label - base, 0), spoken, lead)
    return Script(turns=tuple(turns), is_script=True, label_base=base, lead_pause_ms=lead)


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
    until the next one would exceed the limit. A pause ends its chunk.
    """
    pieces: list[Turn] = []
    for turn in script.turns:
        parts = _pack(split_sentences(turn.text), max_chars)
        for number, part in enumerate(parts):
            pieces.append(Turn(turn.speaker, part, turn.pause_after_ms if number == len(parts) - 1 else 0))

    chunks: list[list[Turn]] = []
    size = 0
    for piece in pieces:
        if chunks and not chunks[-1][-1].pause_after_ms and size + len(piece.text) <= max_chars:
            chunks[-1].append(piece)
            size += len(piece.text)
        else:
            chunks.append([piece])
            size = len(piece.text)
    return [
        Chunk(index=i, turns=tuple(turns), pause_after_ms=turns[-1].pause_after_ms) for i, turns in enumerate(chunks)
    ]


def max_frames_for(chunk: Chunk, frame_rate: float) -> int:
    """A cap on generated frames from the chunk's text length: the runaway guard.

    Read aloud, text runs at about 15 characters per second; the cap allows a third of that
    (5 chars/s) plus two seconds, so only a model that has stopped following the text reaches it.
    """
    seconds = 2.0 + chunk.chars / 5.0
    return max(1, math.ceil(seconds * frame_rate))
