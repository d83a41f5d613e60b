"""'Did you mean' for an unknown name: one rule for settings keys, manifest fields and the like."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

SUGGESTION_CUTOFF = 0.6  # difflib similarity below which no did-you-mean is offered


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or '' when none is close. A dotted key
    ('trian.epochs') also matches a candidate with the same last part ('train.epochs')."""
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=SUGGESTION_CUTOFF)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""
