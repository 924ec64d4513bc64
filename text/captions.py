"""Subtitles (SRT or WebVTT) from cues: a job's chunk or sentence segments, or its words (`caption_unit`)."""

from __future__ import annotations


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early in both formats; "-->" would confuse WebVTT parsers.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines).replace("-->", "->")


def build(segments: list[dict], kind: str) -> str:
    """Subtitle text for `kind` "srt" or "vtt"."""
    if kind == "srt":
        cues = [
            f"{number}\n{_timestamp(s['start_sec'], ',')} --> {_timestamp(s['end_sec'], ',')}\n{_cue_text(s['text'])}"
            for number, s in enumerate(segments, start=1)
        ]
        return "\n\n".join(cues) + "\n" if cues else ""
    if kind == "vtt":
        cues = [
            f"{_timestamp(s['start_sec'], '.')} --> {_timestamp(s['end_sec'], '.')}\n{_cue_text(s['text'])}"
            for s in segments
        ]
        return "WEBVTT\n\n" + "\n\n".join(cues) + ("\n" if cues else "")
    raise ValueError(f"unknown caption kind {kind!r}")
