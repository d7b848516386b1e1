"""Answer-text checks shared by training (data validation, the learned-facts check) and evaluation.

A generation *mentions* a span when the span's normalised words appear as consecutive whole words
of the normalised generation (lowercase, every non-alphanumeric character a space): "Lyon" is in
"It is Lyon." but not in "Lyons". An expected answer may list alternatives as ``a|b``.
"""

from __future__ import annotations

import re

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lowercase, non-alphanumeric characters to spaces, single spaces, stripped."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def mentions(text: str, span: str) -> bool:
    """Whether the normalised ``span`` appears as whole consecutive words of the normalised ``text``."""
    span = normalise(span)
    return bool(span) and f" {span} " in f" {normalise(text)} "


def mentions_any(text: str, expected: str) -> bool:
    """Whether ``text`` mentions one of the ``|``-separated alternatives of ``expected``."""
    return any(mentions(text, option) for option in expected.split("|"))


def repeats_ngram(text: str, n: int = 3) -> bool:
    """Degeneration check: whether some word n-gram occurs twice in ``text`` (normalised words)."""
    words = normalise(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))
