"""Wording shared by every message: a count with its noun in the right number ("1 epoch", "2 epochs").

A core module (beside errors.py) because the engine, the dataset builders and the CLI all count
things in their messages.
"""
from __future__ import annotations


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """`count` and `noun` (given in the singular), e.g. '1 file', '3 files', '0 files'; `plural_noun`
    for a noun whose plural is not noun + 's' ('class' / 'classes')."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"
