"""Text encodings an attacker asks for, and how to read them back: base64 and leetspeak.

The encoders rewrite a request; the decoders turn a model's answer back into plain text
for the harm judge. Decoding is lenient: it decodes what decodes and leaves the rest as
written, since a model's answer is often only partly encoded (or cut off mid-run).
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

LEET: dict[str, str] = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
"""Letter -> digit of :func:`to_leet` (either case of the letter)."""

_FROM_LEET = {digit: letter for letter, digit in LEET.items()} | {"@": "a", "$": "s"}
_LEET_WORD = re.compile(r"[\w@$]+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{8,}={0,2}")
MIN_ASCII = 0.8  # share of ASCII characters a decoded run needs to count as text


def to_base64(text: str) -> str:
    """Standard base64 of the UTF-8 text."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _utf8(raw: bytes) -> str | None:
    """``raw`` as UTF-8 (a multi-byte character cut off at the very end is dropped)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return None
        return _utf8(raw[: exc.start])


def _looks_like_text(text: str) -> bool:
    """No control characters but line breaks and tabs, and mostly ASCII."""
    if any(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text):
        return False
    return sum(c.isascii() for c in text) >= MIN_ASCII * len(text)


def decode_base64_run(run: str) -> str | None:
    """One base64 run as text, or ``None`` when it does not decode to readable text.

    Readable: valid UTF-8, no control characters but line breaks and tabs, at least 80 %
    ASCII. A run cut off mid-block (an answer stopped by the token budget) decodes up to
    its last whole character.
    """
    core = run.rstrip("=")
    if len(core) % 4 == 1:
        core = core[:-1]  # a lone 6-bit group carries no whole byte
    try:
        raw = base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    text = _utf8(raw)
    return text if text and _looks_like_text(text) else None


def decode_base64_spans(text: str) -> str:
    """``text`` with every base64 run that decodes to readable text replaced by it.

    A run is 8+ characters of the base64 alphabet with an upper-case letter and not only
    upper-case letters (a plain word, a path or an identifier is left alone; the encoding
    of a sentence mixes cases or has digits). Runs that do not decode, and everything
    else, stay as written.
    """

    def run(m: re.Match[str]) -> str:
        found = m.group()
        if not any(c.isupper() for c in found) or found.rstrip("=").isalpha() and found.isupper():
            return found  # a word, a path or an identifier
        return decode_base64_run(found) or found

    return _BASE64_RUN.sub(run, text)


def to_leet(text: str) -> str:
    """Leetspeak: a/e/i/o/s/t (either case) become 4/3/1/0/5/7; everything else is kept."""
    return "".join(LEET.get(c.lower(), c) for c in text)


def from_leet(text: str) -> str:
    """Undo leetspeak in words that mix letters with leet digits/symbols (``h4ck`` -> ``hack``).

    Words without a letter (``1``, ``2024``, ``3.5``) are numbers and stay as written, so
    ``Step 1: h4ck`` reads ``Step 1: hack``, but a word that is all leet digits (``15`` for
    "is") stays a number. Decoded letters are lower-case.
    """

    def word(m: re.Match[str]) -> str:
        w = m.group()
        if not any(c.isalpha() for c in w):
            return w
        return "".join(_FROM_LEET.get(c, c) for c in w)

    return _LEET_WORD.sub(word, text)
