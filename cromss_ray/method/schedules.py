"""Epoch schedules of CromSS: the ramp and the selection ratio (spec 5)."""

from __future__ import annotations

import math
from typing import Literal

RampKind = Literal["exp", "linear", "none"]
RAMP_KINDS: tuple[str, ...] = ("exp", "linear", "none")


def ramp(epoch: int, length: int, kind: RampKind = "exp") -> float:
    """Ramp r(e, E) in [0, 1] at zero-based ``epoch`` e for ramp ``length`` E (spec 5).

    * ``"exp"``: ``exp(-5 (1 - min(e, E) / E)^2)``, and 1 when E = 0;
    * ``"linear"``: ``min(e / E, 1)``, and 1 when E = 0;
    * ``"none"``: 1 from the first epoch (the reference crashes on it; here it means no ramp).
    """
    if kind not in RAMP_KINDS:
        raise ValueError(f"ramp kind must be one of {RAMP_KINDS}, got {kind!r}")
    if epoch < 0 or length < 0:
        raise ValueError(f"epoch and ramp length must be non-negative, got epoch={epoch}, length={length}")
    if kind == "none" or length == 0:
        return 1.0
    if kind == "linear":
        return min(epoch / length, 1.0)
    phase = 1.0 - min(epoch, length) / length
    return math.exp(-5.0 * phase * phase)


def selection_ratio(epoch: int, length: int, final: float, kind: RampKind = "exp") -> float:
    """Share rho(e) of each class kept at full segmentation weight (spec 5).

    ``rho(e) = 1 - r(e, E) (1 - final)`` while e <= E, then ``final``: it starts near 1
    and falls to ``final`` (reference 0.5) at the end of the ramp.
    """
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"final selection ratio must lie in [0, 1], got {final}")
    if epoch > length:
        return final
    return 1.0 - ramp(epoch, length, kind) * (1.0 - final)
