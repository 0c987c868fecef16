"""Schedules as pure functions of the optimizer step (no state, so resume is trivial)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, end: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `end` at step `total`.

    `step` is the 0-based index of the optimizer step about to be taken. Steps past `total`
    stay at `end`.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return end
    progress = min(1.0, (step - warmup) / (total - warmup))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restarted_warmup_cosine(step: int, peak: float, end: float, warmup: int,
                            segment_starts: list[int], total: int) -> float:
    """Warmup+cosine that starts over at every step in `segment_starts` (the naive pipeline).

    Segment k runs from segment_starts[k] to the next start (or `total`), with its own warmup.
    With segment_starts == [0] this is `warmup_cosine`.
    """
    starts = sorted(segment_starts)
    if not starts or starts[0] != 0:
        raise ValueError("segment_starts must begin with 0")
    begin = max(s for s in starts if s <= step)
    later = [s for s in starts if s > begin]
    stop = later[0] if later else total
    return warmup_cosine(step - begin, peak, end, min(warmup, stop - begin), stop - begin)


def cubic_fraction(step: int, start: int, span: int, final: float) -> float:
    """Zhu & Gupta cubic ramp: 0 before `start`, `final` from `start + span` on."""
    if step < start:
        return 0.0
    if span <= 0 or step >= start + span:
        return final
    return final - final * (1.0 - (step - start) / span) ** 3


def linear_ramp(step: int, start: int, span: int, begin_value: float, end_value: float) -> float:
    """`begin_value` until `start`, linear to `end_value` over `span` steps, then `end_value`."""
    if step <= start or span <= 0:
        return begin_value if step <= start else end_value
    t = min(1.0, (step - start) / span)
    return begin_value + (end_value - begin_value) * t
