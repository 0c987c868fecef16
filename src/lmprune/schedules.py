"""Schedules as pure functions of the optimizer step (no state, so resume is trivial).

Formulas: docs/algorithms.md, "Schedules".
"""

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


def warmup_stable_decay(step: int, peak: float, end: float, warmup: int, total: int, decay: int) -> float:
    """Linear warmup to `peak`, `peak` held (the stable phase), then a linear decay to `end` over the
    last `decay` steps of `total` (WSD). Steps past `total` stay at `end`.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = total - decay
    if step < decay_start:
        return peak
    if decay <= 0:
        return end
    progress = min(1.0, (step - decay_start + 1) / decay)
    return peak + (end - peak) * progress


def segmented_warmup_cosine(step: int, peak: float, end: float, warmup: int,
                            segments: list[tuple[int, int]], wsd_decay: float | None = None) -> float:
    """A warmup+cosine that starts over at each segment (the naive / restarted pipelines).

    `segments` are (start_step, length) pairs sorted by start, the first starting at 0; the segment
    that covers `step` is the last one whose start is <= step, and runs its own warmup+cosine over
    `length` steps. One segment (0, total) is the plain `warmup_cosine`: the IDEA schedule.
    With `wsd_decay` (a fraction) every segment is a `warmup_stable_decay` whose decay is the last
    `wsd_decay` of the segment instead.
    """
    if not segments or segments[0][0] != 0:
        raise ValueError("segments must start at step 0")
    start, length = max((s for s in segments if s[0] <= step), key=lambda s: s[0])
    if wsd_decay is not None:
        return warmup_stable_decay(step - start, peak, end, min(warmup, length), length,
                                   int(round(wsd_decay * length)))
    return warmup_cosine(step - start, peak, end, min(warmup, length), length)


def cubic_ramp(step: int, start: int, span: int, initial: float, final: float) -> float:
    """The Zhu & Gupta cubic ramp every pruning method uses for its pruned fraction:

    0 before `start`; final + (initial - final) * (1 - (step - start) / span)**3 on [start, start + span];
    `final` from start + span on (and from `start` when span <= 0: one shot).
    """
    if step < start:
        return 0.0
    if span <= 0 or step >= start + span:
        return final
    return final + (initial - final) * (1.0 - (step - start) / span) ** 3


def linear_ramp(step: int, start: int, span: int, begin_value: float, end_value: float) -> float:
    """`begin_value` until `start`, linear to `end_value` over `span` steps, then `end_value`."""
    if step <= start or span <= 0:
        return begin_value if step <= start else end_value
    t = min(1.0, (step - start) / span)
    return begin_value + (end_value - begin_value) * t
