"""Pronunciations for words the aligner's dictionary lacks: numbers, names, acronyms, coinages.

The aligner only needs a plausible phone sequence of about the right length: forced alignment
then places the word between its neighbours. So numbers are spelled out, short capitalised
words are spelled letter by letter, known stems take their suffix, and anything else goes
through a small set of English spelling rules (ARPAbet phones of the CMU dictionary).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Lookup = Callable[[str], str | None]  # a dictionary: word -> "PH ON ES", or None

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))

# Longest spellings first; each maps to ARPAbet phones (stress marks are not used by the model).
_SPELLINGS = {
    "tch": "CH", "sch": "S K", "igh": "AY", "ough": "AO", "augh": "AO", "tion": "SH AH N", "sion": "ZH AH N",
    "ch": "CH", "sh": "SH", "th": "TH", "ph": "F", "wh": "W", "ck": "K", "ng": "NG", "qu": "K W", "kn": "N",
    "wr": "R", "ee": "IY", "ea": "IY", "oo": "UW", "ou": "AW", "ow": "OW", "oi": "OY", "oy": "OY", "ai": "EY",
    "ay": "EY", "au": "AO", "aw": "AO", "ei": "EY", "ey": "IY", "ie": "IY", "ue": "UW", "ew": "UW", "ar": "AA R",
    "er": "ER", "ir": "ER", "ur": "ER", "or": "AO R",
    "a": "AE", "b": "B", "c": "K", "d": "D", "e": "EH", "f": "F", "g": "G", "h": "HH", "i": "IH", "j": "JH",
    "k": "K", "l": "L", "m": "M", "n": "N", "o": "AA", "p": "P", "q": "K", "r": "R", "s": "S", "t": "T",
    "u": "AH", "v": "V", "w": "W", "x": "K S", "y": "IY", "z": "Z",
}  # fmt: skip
_LONGEST = max(len(key) for key in _SPELLINGS)
_SUFFIXES = (("'s", "Z"), ("s", "Z"), ("es", "IH Z"), ("ed", "D"), ("ing", "IH NG"), ("ly", "L IY"), ("er", "ER"))


def number_words(digits: str) -> list[str]:
    """Digits as spoken English words: years read in pairs ("nineteen sixty nine"), else cardinals."""
    value = int(digits)
    if len(digits) == 4 and (1100 <= value <= 1999 or 2010 <= value <= 2099):
        high, low = divmod(value, 100)
        tail = _cardinal(low) if low >= 10 else (["oh", *_cardinal(low)] if low else ["hundred"])
        return _cardinal(high) + tail
    if len(digits) > 15:  # a long code: read digit by digit
        return [_ONES[int(d)] for d in digits]
    return _cardinal(value)


def _cardinal(value: int) -> list[str]:
    if value < 20:
        return [_ONES[value]]
    if value < 100:
        return [_TENS[value // 10]] + ([_ONES[value % 10]] if value % 10 else [])
    if value < 1000:
        rest = value % 100
        return [_ONES[value // 100], "hundred"] + (_cardinal(rest) if rest else [])
    for scale, name in _SCALES:
        if value >= scale:
            rest = value % scale
            return _cardinal(value // scale) + [name] + (_cardinal(rest) if rest else [])
    return [_ONES[0]]  # unreachable: every value >= 1000 has a scale


def spelled(word: str) -> str:
    """Phones from English spelling rules: longest letter group first, doubled letters once,
    a final silent e dropped."""
    letters = re.sub(r"[^a-z]", "", word.lower())
    if len(letters) > 2 and letters.endswith("e") and letters[-2] not in "aeiouy":
        letters = letters[:-1]
    letters = re.sub(r"([b-df-hj-np-tv-z])\1", r"\1", letters)
    phones: list[str] = []
    position = 0
    while position < len(letters):
        for size in range(min(_LONGEST, len(letters) - position), 0, -1):
            group = letters[position : position + size]
            if group in _SPELLINGS:
                phones.append("Y" if group == "y" and position == 0 else _SPELLINGS[group])
                position += size
                break
    return " ".join(phones) or "AH"


def pronounce(word: str, lookup: Lookup) -> str:
    """Phones for one written word (already lower-cased, outer punctuation removed)."""
    known = lookup(word)
    if known:
        return known
    if re.fullmatch(r"\d{1,3}(,\d{3})+", word):  # "1,000"
        word = word.replace(",", "")
    parts = [part for part in re.split(r"[-–/.,]+", word) if part]
    if len(parts) > 1:
        return " ".join(pronounce(part, lookup) for part in parts)
    if re.fullmatch(r"\d+", word):
        return " ".join(lookup(spoken) or spelled(spoken) for spoken in number_words(word))
    number = re.fullmatch(r"(\d+)(st|nd|rd|th|s|%)", word)
    if number:
        ending = {"%": "P ER S EH N T", "s": "Z"}.get(number.group(2), "TH")
        return pronounce(number.group(1), lookup) + " " + ending
    if re.fullmatch(r"[a-z]\d+|\d+[a-z]", word):  # "b2", "4k"
        return " ".join(pronounce(part, lookup) for part in re.findall(r"\d+|[a-z]", word))
    for suffix, phones in _SUFFIXES:
        stem = word.removesuffix(suffix)
        if stem != word and len(stem) > 2 and lookup(stem):
            return f"{lookup(stem)} {phones}"
    if word.isalpha() and len(word) <= 4 and not re.search(r"[aeiouy]", word):  # "cnn", "tv"
        return " ".join(lookup(letter) or spelled(letter) for letter in word)
    return spelled(word)


def letters_only(word: str) -> str:
    """The dictionary key of a written word: lower case, outer punctuation removed."""
    return re.sub(r"^[^\w]+|[^\w]+$", "", word.lower()).replace("’", "'")
