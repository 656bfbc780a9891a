"""The one input representation every encoder sees (spec 9): the reference's v8 codes / 255.

Per band, ``v8 = clip((v - (mu - 2 sigma)) / (4 sigma) * 255, 0, 255)`` truncated to
uint8, and the network input is ``v8 / 255``, with ``v`` S1 backscatter in dB or S2 L1C
digital numbers and ``mu``, ``sigma`` the SSL4EO-S12 band statistics below. The arithmetic
follows the reference's loaders: the values in float32, ``mu - 2 sigma`` and
``(mu + 2 sigma) - (mu - 2 sigma)`` computed in float64 and rounded to float32, then
subtract, divide, multiply by 255, clip, truncate (a floor: the values are non-negative)
and divide by 255, each step in float32 (NaN codes 0). Shards say per modality whether
they hold ``physical`` values (which go through the rule) or the released ``v8`` codes
(which are only divided by 255): :attr:`ModalitySpec.representation`.

:func:`network_input` is the numpy path; ``device.to_device`` runs the same steps on
the batch's device with the constants of :func:`input_rule`, so both give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cromss_ray.data.schema import MODALITY_BANDS, PHYSICAL_UNITS, S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec

S1_MEAN = (-12.54847273, -20.19237134)
S1_STD = (5.25697717, 5.91150917)
S2_MEAN = (
    1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118, 2371.7172463,
    2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323, 1524.06546312,
)  # fmt: skip
S2_STD = (
    786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054, 1274.39184232,
    1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639, 1136.53823676,
)  # fmt: skip
"""SSL4EO-S12 statistics (the reference's 50k-location subset), S2 in L1C band order (spec 9)."""

BAND_STATISTICS: dict[str, tuple[float, float]] = {
    **dict(zip(S1_BAND_NAMES, zip(S1_MEAN, S1_STD, strict=True), strict=True)),
    **dict(zip(S2_BAND_NAMES, zip(S2_MEAN, S2_STD, strict=True), strict=True)),
}
"""``(mu, sigma)`` per band name; a band subset takes the statistics of the bands it keeps."""

TO_RULE_UNIT = {"s1": 1.0, "s2": 1e4}
"""Factor from each modality's physical unit onto the rule's: dB stays, reflectance -> L1C digital numbers."""

V8_MAX = 255
MEAN_CODE = 127
"""The code of a band's mean: ``mu`` lies 127.5 of the 255 steps above ``mu - 2 sigma``. Prediction feeds it
in place of a pixel it masks (``models.segmenter``)."""


@dataclass(frozen=True)
class InputRule:
    """float32 constants of one modality's rule, per band (length B) where they vary.

    ``v8``: the stored values are v8 codes, only divided by 255. Otherwise the stored
    values become the rule's unit as ``stored * gain + bias`` (steps skipped when the gain
    is 1 and the bias 0, as for raw dB and digital numbers), then go through the rule
    with ``low = mu - 2 sigma`` and ``span = (mu + 2 sigma) - (mu - 2 sigma)``.
    """

    v8: bool
    gain: np.float32
    bias: np.float32
    low: np.ndarray
    span: np.ndarray

    @property
    def identity(self) -> bool:
        return self.gain == 1 and self.bias == 0


def input_rule(spec: ModalitySpec) -> InputRule:
    """The constants of ``spec``'s rule; errors name a band outside S1 / S2 or an undeclared representation."""
    unknown = [band for band in spec.bands if band not in BAND_STATISTICS]
    if unknown:
        raise ValueError(f"band {unknown[0]!r} has no SSL4EO-S12 statistics (S1 {S1_BAND_NAMES}, S2 {S2_BAND_NAMES})")
    if spec.representation is None:
        raise ValueError("the modality does not declare its representation ('physical' or 'v8')")
    mu = np.array([BAND_STATISTICS[band][0] for band in spec.bands], np.float64)
    sigma = np.array([BAND_STATISTICS[band][1] for band in spec.bands], np.float64)
    low, high = mu - 2 * sigma, mu + 2 * sigma
    factor = 1.0
    if spec.representation == "physical":
        factor = physical_factor(spec)
    return InputRule(
        v8=spec.representation == "v8",
        gain=np.float32(spec.scale * factor),
        bias=np.float32(spec.offset * factor),
        low=low.astype(np.float32),
        span=(high - low).astype(np.float32),
    )


def physical_factor(spec: ModalitySpec) -> float:
    """Factor from ``spec``'s physical unit onto the rule's; the unit must be its modality's."""
    for modality, names in MODALITY_BANDS.items():
        if set(spec.bands) <= set(names):
            if spec.unit != PHYSICAL_UNITS[modality]:
                raise ValueError(f"{modality} physical values must be in {PHYSICAL_UNITS[modality]!r}, not {spec.unit!r}")
            return TO_RULE_UNIT[modality]
    raise ValueError(f"bands {list(spec.bands)} mix S1 and S2")


def _band_axis(constants: np.ndarray) -> np.ndarray:
    """Per-band constants shaped to broadcast over (..., B, H, W)."""
    return constants.reshape(-1, 1, 1)


def v8_codes(stored: np.ndarray, spec: ModalitySpec) -> np.ndarray:
    """The reference's uint8 codes of physical values stored as ``spec`` declares (bands on axis -3)."""
    rule = input_rule(spec)
    if rule.v8:
        raise ValueError("the modality already holds v8 codes")
    _check_bands(stored, spec)
    return _codes(stored, rule)


def network_input(stored: np.ndarray, spec: ModalitySpec) -> np.ndarray:
    """float32 network input (spec 9) of one modality's stored array, same shape, bands on axis -3."""
    rule = input_rule(spec)
    _check_bands(stored, spec)
    codes = np.asarray(stored) if rule.v8 else _codes(stored, rule)
    return codes.astype(np.float32) / np.float32(V8_MAX)


def convert_storage(stored: np.ndarray, source: ModalitySpec, target: ModalitySpec) -> np.ndarray:
    """float32 values stored as ``target`` declares with the network input of ``stored`` (stored as
    ``source``), same shape, bands on axis -3.

    The values themselves when both store alike; the v8 codes for a ``v8`` target; else each
    code's middle value, ``mu - 2 sigma + (code + 0.5) / 255 * 4 sigma`` in ``target``'s unit
    and scaling (physical values are only known to the code's step once they are codes).
    """
    if source.with_bands(target.bands) == target:
        _check_bands(stored, target)
        return np.asarray(stored, np.float32)
    codes = np.rint(network_input(stored, source) * np.float32(V8_MAX)).astype(np.float64)
    rule = input_rule(target)
    if rule.v8:
        return codes.astype(np.float32)
    middle = _band_axis(rule.low.astype(np.float64)) + (codes + 0.5) / V8_MAX * _band_axis(rule.span.astype(np.float64))
    return ((middle - float(rule.bias)) / float(rule.gain)).astype(np.float32)


def _codes(stored: np.ndarray, rule: InputRule) -> np.ndarray:
    values = np.asarray(stored).astype(np.float32)
    if not rule.identity:
        values = values * rule.gain + rule.bias
    scaled = (values - _band_axis(rule.low)) / _band_axis(rule.span) * np.float32(V8_MAX)
    return np.floor(np.clip(np.nan_to_num(scaled, nan=0.0), 0, V8_MAX)).astype(np.uint8)


def _check_bands(stored: np.ndarray, spec: ModalitySpec) -> None:
    if np.ndim(stored) < 3 or np.shape(stored)[-3] != len(spec.bands):
        raise ValueError(f"array of shape {np.shape(stored)} does not hold the {len(spec.bands)} bands on axis -3")
