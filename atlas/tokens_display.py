"""
Token and corpus strings -> visible plain text for the atlas site.

Every string that comes from the corpus or the tokenizer is untrusted and often invisible:
leading spaces, newlines, NUL bytes, bidi overrides (U+202E flips the rest of a line),
zero-width joiners, half of a multi-byte UTF-8 character. The site shows them as visible
characters so a reader sees what the model saw and nothing can reorder or hide text.

Notable choices
- Token bytes are decoded as UTF-8 with replacement (U+FFFD): BPE tokens are often partial
  characters, and a replacement mark is the honest display of that.
- In tokens a space becomes '·' (the tokenizer-viewer convention: " the" -> "·the"), a newline
  '↵', a tab '→'. In free text (labels, model-card values) ordinary spaces stay spaces.
- Control characters become "\\x00"-style escapes; format, bidi, zero-width, separator,
  surrogate, private-use and unassigned code points become "\\u202e"-style escapes.
- Output is plain text, never HTML: escaping for HTML is the templates' job (autoescape).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Unicode categories that render as nothing, reorder text, or render unpredictably.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def visible_token(token_bytes: bytes | None) -> str:
    """One token's raw bytes -> its visible form (spaces as '·')."""
    if token_bytes is None:
        return ""
    text = bytes(token_bytes).decode("utf-8", errors="replace")
    if _SPECIAL_TOKEN.fullmatch(text):
        return text  # special tokens are stored as their literal name, e.g. <|bos|>
    return "".join(map(_visible_token_char, text))


def visible_text(text: str | None) -> str:
    """Free text (a label, a model-card value) -> visible form; ordinary spaces stay spaces."""
    if text is None:
        return ""
    return "".join(map(_visible_text_char, str(text)))


def is_special_token(display: str) -> bool:
    """True for tokenizer specials such as <|bos|> (the site styles them apart)."""
    return _SPECIAL_TOKEN.fullmatch(display) is not None


@lru_cache(maxsize=None)
def _visible_token_char(ch: str) -> str:
    if ch == " ":
        return "\u00b7"
    return _visible_text_char(ch)


@lru_cache(maxsize=None)
def _visible_text_char(ch: str) -> str:
    if ch == " ":
        return ch
    if ch == "\n":
        return "\u21b5"
    if ch == "\t":
        return "\u2192"
    code = ord(ch)
    if unicodedata.category(ch) not in _HIDDEN_CATEGORIES:
        return ch
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
