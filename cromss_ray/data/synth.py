"""Realistic synthetic NoLDO-S12 scenes for demos, tests and benchmarks (spec 9, 10).

A scene is a smooth random land-cover map (class fields of different patch sizes, crop
parcels from a warped Voronoi tessellation, small objects), rendered per season into
Sentinel-2 L1C top-of-atmosphere reflectance (13 bands, mixed from class endmember
spectra, with seasonal change: crop phenology, leaf-off trees, grass browning, snow,
spring flooding) and Sentinel-1 VV/VH backscatter (dB, mixed in linear power, with
multiplicative speckle). Pretraining rows also get Dynamic-World-like noisy labels whose
corrupted-pixel share is ``noise_rate`` exactly. The model is described in
``docs/data.md``; everything is vectorised numpy/scipy, deterministic per (seed, index).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import fft, ndimage, special
from scipy.spatial import cKDTree

from cromss_ray.data.schema import (
    CLASS_SCHEMES,
    NODATA,
    S1_BAND_NAMES,
    S1_DB_RANGE,
    S2_BAND_NAMES,
    Manifest,
    ModalitySpec,
    ShardMetadata,
)
from cromss_ray.data.shards import ShardWriter

SynthKind = Literal["pretrain", "dw", "osm", "dfc2020"]
ProgressCallback = Callable[[int, int], None]

SEASONS = ("winter", "spring", "summer", "autumn")
WINTER, SPRING, SUMMER, AUTUMN = range(4)
SEASON_MONTHS = ((1, 2), (4, 5), (7, 8), (10, 11))


ENDMEMBERS = (
    "water",
    "trees",
    "trees_leafoff",
    "grass",
    "grass_dry",
    "flooded_vegetation",
    "crop_green",
    "soil",
    "shrub",
    "built",
    "bare",
    "snow",
)
EM = {name: index for index, name in enumerate(ENDMEMBERS)}

S2_REFLECTANCE = np.array(
    [
        # B1    B2    B3    B4    B5    B6    B7    B8    B8A   B9    B10    B11   B12
        [0.115, 0.090, 0.070, 0.045, 0.035, 0.025, 0.022, 0.020, 0.018, 0.008, 0.001, 0.010, 0.006],  # water
        [0.110, 0.080, 0.075, 0.045, 0.090, 0.200, 0.245, 0.265, 0.280, 0.095, 0.003, 0.140, 0.065],  # trees
        [0.115, 0.090, 0.085, 0.080, 0.110, 0.140, 0.155, 0.165, 0.175, 0.070, 0.003, 0.200, 0.130],  # trees, leaf-off
        [0.115, 0.085, 0.090, 0.065, 0.120, 0.240, 0.285, 0.300, 0.315, 0.105, 0.004, 0.210, 0.115],  # grass
        [0.125, 0.105, 0.120, 0.140, 0.170, 0.205, 0.220, 0.235, 0.245, 0.090, 0.004, 0.300, 0.220],  # dry grass
        [
            0.110,
            0.080,
            0.075,
            0.055,
            0.075,
            0.140,
            0.165,
            0.170,
            0.175,
            0.060,
            0.002,
            0.090,
            0.045,
        ],  # flooded vegetation
        [0.115, 0.085, 0.095, 0.055, 0.130, 0.300, 0.370, 0.400, 0.415, 0.130, 0.004, 0.220, 0.105],  # green crop
        [0.125, 0.105, 0.115, 0.130, 0.150, 0.170, 0.180, 0.190, 0.200, 0.080, 0.004, 0.270, 0.230],  # tilled soil
        [0.120, 0.095, 0.100, 0.095, 0.135, 0.180, 0.200, 0.215, 0.225, 0.085, 0.004, 0.250, 0.170],  # shrub
        [0.150, 0.135, 0.140, 0.145, 0.160, 0.175, 0.185, 0.195, 0.200, 0.080, 0.005, 0.230, 0.210],  # built
        [0.160, 0.155, 0.185, 0.230, 0.260, 0.275, 0.285, 0.295, 0.305, 0.110, 0.005, 0.380, 0.330],  # bare ground
        [0.750, 0.760, 0.750, 0.720, 0.700, 0.660, 0.640, 0.620, 0.590, 0.280, 0.020, 0.090, 0.070],  # snow
    ],
    dtype=np.float32,
)
"""Top-of-atmosphere reflectance of each endmember in the 13 L1C bands: water dark in NIR
and SWIR, vegetation bright in red edge and NIR, snow bright in the visible and dark in
SWIR, built area bright and flat, bare ground brightest in SWIR."""

S1_BACKSCATTER_DB = np.array(
    [
        [-21.0, -28.0],  # water (calm; wind adds up to 6 dB)
        [-7.5, -13.0],  # trees
        [-8.5, -15.0],  # trees, leaf-off
        [-11.0, -18.0],  # grass
        [-12.5, -20.5],  # dry grass
        [-5.0, -14.0],  # flooded vegetation (double bounce)
        [-9.0, -15.0],  # green crop
        [-12.0, -19.5],  # tilled soil
        [-9.5, -16.0],  # shrub
        [-2.5, -9.0],  # built (double bounce, corner reflectors)
        [-14.0, -23.0],  # bare ground
        [-15.0, -22.0],  # snow (wet snow absorbs)
    ],
    dtype=np.float32,
)
"""Mean VV, VH backscatter (dB) of each endmember."""

BAND_BLUR_SIGMA = np.array([2.0, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.5, 0.9, 2.0, 2.0, 0.9, 0.9], dtype=np.float32)
"""Point-spread blur (pixels) per band: 10 m, 20 m and 60 m native resolution."""
HAZE_PROFILE = np.array([1.0, 0.8, 0.6, 0.4, 0.3, 0.25, 0.2, 0.2, 0.2, 0.1, 0.0, 0.05, 0.03], dtype=np.float32)
SPECKLE_LOOKS = 4.4
SAR_NOISE_FLOOR_DB = -28.0


@dataclass(frozen=True)
class ClassModel:
    """How one class of a scheme looks: endmember mix, typical share and patch size."""

    name: str
    composition: Mapping[str, float]
    prevalence: float
    patch_px: float
    parcels: bool = False


DW_MODELS = (
    ClassModel("water", {"water": 1.0}, 0.08, 40),
    ClassModel("trees", {"trees": 1.0}, 0.22, 28),
    ClassModel("grass", {"grass": 1.0}, 0.14, 18),
    ClassModel("flooded vegetation", {"flooded_vegetation": 1.0}, 0.03, 14),
    ClassModel("crops", {"crop_green": 1.0}, 0.20, 32, parcels=True),
    ClassModel("shrub and scrub", {"shrub": 1.0}, 0.10, 16),
    ClassModel("built area", {"built": 1.0}, 0.08, 20),
    ClassModel("bare ground", {"bare": 1.0}, 0.07, 26),
    ClassModel("snow and ice", {"snow": 1.0}, 0.01, 30),
)
OSM_MODELS = (
    ClassModel("urban fabric", {"built": 0.7, "grass": 0.2, "trees": 0.1}, 0.10, 22),
    ClassModel("industrial, commercial and transport", {"built": 0.9, "bare": 0.1}, 0.06, 18),
    ClassModel("arable land", {"crop_green": 1.0}, 0.20, 32, parcels=True),
    ClassModel("artificial non-agricultural vegetation", {"grass": 0.75, "trees": 0.15, "built": 0.1}, 0.04, 12),
    ClassModel("forest", {"trees": 1.0}, 0.20, 30),
    ClassModel("mine, dump and construction", {"bare": 0.8, "soil": 0.2}, 0.02, 12),
    ClassModel("water bodies", {"water": 1.0}, 0.07, 36),
    ClassModel("open spaces", {"bare": 0.5, "grass_dry": 0.5}, 0.03, 14),
    ClassModel("pastures", {"grass": 1.0}, 0.12, 24, parcels=True),
    ClassModel("shrub and herbaceous", {"shrub": 0.8, "grass": 0.2}, 0.07, 18),
    ClassModel("permanent crops", {"trees": 0.45, "crop_green": 0.3, "soil": 0.25}, 0.04, 16, parcels=True),
    ClassModel("wetlands", {"flooded_vegetation": 1.0}, 0.03, 14),
    ClassModel("coastal wetlands", {"flooded_vegetation": 0.6, "water": 0.4}, 0.02, 14),
)
DFC2020_MODELS = (
    ClassModel("water", {"water": 1.0}, 0.10, 40),
    ClassModel("forest", {"trees": 1.0}, 0.22, 28),
    ClassModel("grassland", {"grass": 1.0}, 0.16, 20),
    ClassModel("wetland", {"flooded_vegetation": 1.0}, 0.03, 14),
    ClassModel("cropland", {"crop_green": 1.0}, 0.20, 32, parcels=True),
    ClassModel("shrubland", {"shrub": 1.0}, 0.10, 16),
    ClassModel("urban", {"built": 1.0}, 0.10, 20),
    ClassModel("barren", {"bare": 1.0}, 0.09, 26),
)
SCHEME_MODELS: dict[str, tuple[ClassModel, ...]] = {
    "pretrain": DW_MODELS,
    "dw": DW_MODELS,
    "osm": OSM_MODELS,
    "dfc2020": DFC2020_MODELS,
}

DW_WATER, DW_TREES, DW_GRASS, DW_FLOODED, DW_CROPS, DW_SHRUB, DW_BUILT, DW_BARE, DW_SNOW = range(9)
CONFUSION_PARTNERS = np.array(
    [
        [DW_FLOODED, DW_FLOODED],  # water -> flooded vegetation
        [DW_SHRUB, DW_GRASS],  # trees -> shrub, grass
        [DW_SHRUB, DW_CROPS],  # grass -> shrub, crops
        [DW_WATER, DW_GRASS],  # flooded vegetation -> water, grass
        [DW_GRASS, DW_BARE],  # crops -> grass, bare
        [DW_GRASS, DW_TREES],  # shrub -> grass, trees
        [DW_BARE, DW_BARE],  # built -> bare
        [DW_BUILT, DW_SHRUB],  # bare -> built, shrub
        [DW_BARE, DW_WATER],  # snow -> bare, water (ice)
    ],
    dtype=np.uint8,
)
"""Two Dynamic-World-like confusions per class (spec 10 class order); a smooth field picks one."""
WINTER_CROP_PARTNER = DW_BARE
NOISE_MECHANISMS = ("boundary", "confusion", "missed_small_objects", "flicker")

SUMMER_CROP_GREENNESS = np.array([0.0, 0.35, 1.0, 0.15], dtype=np.float32)
WINTER_CROP_GREENNESS = np.array([0.3, 0.9, 0.1, 0.25], dtype=np.float32)
LEAF_OFF_SHARE = np.array([1.0, 0.3, 0.0, 0.5], dtype=np.float32)
DRY_GRASS_SHARE = np.array([0.0, 0.0, 1.0, 0.5], dtype=np.float32)
ILLUMINATION = np.array([0.9, 1.0, 1.02, 0.95], dtype=np.float32)


def _uniform(field_values: np.ndarray) -> np.ndarray:
    """Map a standard-normal field to uniform [0, 1] values (its normal CDF)."""
    return special.ndtr(field_values).astype(np.float32)


def smooth_fields(rng: np.random.Generator, size: int, lengths: Sequence[float]) -> np.ndarray:
    """(len(lengths), size, size) Gaussian random fields, mean 0 and std 1 each.

    White noise low-pass filtered in the Fourier domain with a Gaussian of sigma
    ``length / 2`` px, on a domain padded by ``length`` so that the periodic wrap-around of
    the FFT does not show; one FFT for all fields.
    """
    pad = int(np.ceil(max(lengths)))
    domain = fft.next_fast_len(size + 2 * pad, real=True)
    noise = rng.standard_normal((len(lengths), domain, domain), dtype=np.float32)
    freq_y = fft.fftfreq(domain).astype(np.float32)[:, None]
    freq_x = fft.rfftfreq(domain).astype(np.float32)[None, :]
    radius2 = freq_y**2 + freq_x**2
    sigmas = np.asarray(lengths, dtype=np.float32)[:, None, None] / 2.0
    transfer = np.exp(-2.0 * np.pi**2 * sigmas**2 * radius2[None])
    fields = fft.irfft2(fft.rfft2(noise) * transfer, s=(domain, domain))[:, pad : pad + size, pad : pad + size]
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= np.maximum(fields.std(axis=(1, 2), keepdims=True), 1e-6)
    return fields.astype(np.float32)


def smooth_field(rng: np.random.Generator, size: int, length: float) -> np.ndarray:
    """One (size, size) Gaussian random field of correlation length ``length`` px (see :func:`smooth_fields`)."""
    return smooth_fields(rng, size, [length])[0]


def composition_matrix(models: tuple[ClassModel, ...]) -> np.ndarray:
    """(C, E) endmember abundances of each class; each row sums to 1."""
    matrix = np.zeros((len(models), len(ENDMEMBERS)), dtype=np.float32)
    for index, model in enumerate(models):
        for name, share in model.composition.items():
            matrix[index, EM[name]] = share
    return matrix / matrix.sum(axis=1, keepdims=True)


@dataclass
class Scene:
    """The static part of a location: land cover, parcels, small objects and its climate."""

    base: np.ndarray  # (H, W) class map before small objects
    land_cover: np.ndarray  # (H, W) class map with small objects
    small_objects: np.ndarray  # (H, W) bool
    parcels: np.ndarray  # (H, W) int parcel id (warped Voronoi cells)
    parcel_count: int
    cold: bool
    dry: bool
    floods: bool
    greenness: np.ndarray  # (parcels, 4) crop greenness per season
    deciduous: np.ndarray  # (H, W) leaf-off share of trees in winter
    snow_field: np.ndarray  # (H, W) where snow lies first
    flood_field: np.ndarray  # (H, W) where flooding happens first


def _parcels(rng: np.random.Generator, warp_rows: np.ndarray, warp_cols: np.ndarray) -> tuple[np.ndarray, int]:
    """Voronoi cells of about 22 px with boundaries warped by 3 px: fields and parcels."""
    size = warp_rows.shape[0]
    count = max(4, int(size * size / 22.0**2))
    seeds = rng.uniform(0, size, size=(count, 2))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    points = np.stack([(rows + 3.0 * warp_rows).ravel(), (cols + 3.0 * warp_cols).ravel()], axis=1)
    _, nearest = cKDTree(seeds).query(points)
    return nearest.reshape(size, size).astype(np.int32), count


def _snap_to_parcels(
    base: np.ndarray, parcels: np.ndarray, parcel_count: int, models: tuple[ClassModel, ...]
) -> np.ndarray:
    """Give every parcel whose majority class is agricultural that class in full (field edges)."""
    classes = len(models)
    votes = np.bincount(parcels.ravel() * classes + base.ravel(), minlength=parcel_count * classes)
    majority = votes.reshape(parcel_count, classes).argmax(axis=1)
    agricultural = np.array([model.parcels for model in models])[majority]
    return np.where(agricultural[parcels], majority[parcels], base).astype(np.uint8)


def make_scene(rng: np.random.Generator, models: tuple[ClassModel, ...], size: int, allow_snow: bool) -> Scene:
    """Draw the land-cover map and climate of one location."""
    base_share = np.array([model.prevalence for model in models])
    share = rng.dirichlet(6.0 * base_share / base_share.sum() + 0.05)
    fields = smooth_fields(rng, size, [model.patch_px for model in models])
    fields += np.log(share + 1e-3)[:, None, None].astype(np.float32)
    warp_rows, warp_cols, deciduous, snow_field, flood_field = smooth_fields(rng, size, [16, 16, 30, 45, 12])
    parcels, parcel_count = _parcels(rng, warp_rows, warp_cols)
    base = _snap_to_parcels(fields.argmax(axis=0).astype(np.uint8), parcels, parcel_count, models)
    land_cover, small_objects = _add_small_objects(rng, base, models)

    summer_crop = rng.random(parcel_count) < 0.55
    greenness = np.where(summer_crop[:, None], SUMMER_CROP_GREENNESS, WINTER_CROP_GREENNESS)
    greenness = np.clip(greenness + rng.normal(0, 0.08, size=greenness.shape), 0, 1).astype(np.float32)
    return Scene(
        base=base,
        land_cover=land_cover,
        small_objects=small_objects,
        parcels=parcels,
        parcel_count=parcel_count,
        cold=allow_snow and bool(rng.random() < 0.3),
        dry=bool(rng.random() < 0.35),
        floods=bool(rng.random() < 0.25),
        greenness=greenness,
        deciduous=np.clip(rng.uniform(0.2, 0.9) + 0.2 * deciduous, 0, 1),
        snow_field=snow_field,
        flood_field=flood_field,
    )


def _dominant_class(models: tuple[ClassModel, ...], endmember: str) -> int | None:
    """The class most made of ``endmember`` (the class small objects of it belong to)."""
    shares = [model.composition.get(endmember, 0.0) for model in models]
    best = int(np.argmax(shares))
    return best if shares[best] >= 0.5 else None


def _add_small_objects(
    rng: np.random.Generator, base: np.ndarray, models: tuple[ClassModel, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Sprinkle buildings, ponds and tree clumps of 2-6 px (what coarse labels miss)."""
    size = base.shape[0]
    land_cover = base.copy()
    mask = np.zeros(base.shape, dtype=bool)
    water = _dominant_class(models, "water")
    for endmember, per_pixel, (low, high) in (
        ("built", 1 / 2500, (2, 4)),
        ("water", 1 / 12000, (2, 5)),
        ("trees", 1 / 6000, (3, 6)),
    ):
        target = _dominant_class(models, endmember)
        if target is None:
            continue
        count = rng.poisson(size * size * per_pixel)
        sides = rng.integers(low, high + 1, size=count)
        tops = rng.integers(0, max(size - high, 1), size=count)
        lefts = rng.integers(0, max(size - high, 1), size=count)
        for side, top, left in zip(sides, tops, lefts, strict=True):
            window = (slice(top, top + side), slice(left, left + side))
            if water is not None and (base[window] == water).any():
                continue
            if (base[window] == target).all():
                continue
            land_cover[window] = target
            mask[window] = True
    return land_cover, mask


@dataclass
class Season:
    """One season of a location: clean labels and the surface state that images show."""

    index: int
    clean: np.ndarray  # (H, W) uint8
    snow: np.ndarray  # (H, W) snow cover fraction
    flooded: np.ndarray  # (H, W) bool, vegetation under water


def make_season(scene: Scene, season: int, models: tuple[ClassModel, ...], snow_class: int | None) -> Season:
    """Clean labels and surface state of one season: snow at cold locations, spring floods."""
    snow = np.zeros(scene.base.shape, dtype=np.float32)
    if scene.cold and season in (WINTER, SPRING):
        cover = 0.75 if season == WINTER else 0.15
        threshold = np.quantile(scene.snow_field, 1.0 - cover)
        snow = np.clip((scene.snow_field - threshold) / 0.4 + 0.5, 0.0, 1.0)
    clean = scene.land_cover.copy()
    flooded = np.zeros(scene.base.shape, dtype=bool)
    flooded_class = _dominant_class(models, "flooded_vegetation")
    water_class = _dominant_class(models, "water")
    if scene.floods and season == SPRING and flooded_class is not None and water_class is not None:
        flooded = (clean == flooded_class) & (scene.flood_field > -0.3)
        clean[flooded] = water_class
    trees_class = _dominant_class(models, "trees")
    if snow_class is not None:
        visible = snow * (0.45 if trees_class is None else np.where(clean == trees_class, 0.45, 1.0))
        clean[visible >= 0.5] = snow_class
    return Season(index=season, clean=clean, snow=snow, flooded=flooded)


def abundances(scene: Scene, season: Season, compositions: np.ndarray) -> np.ndarray:
    """(E, H, W) endmember fractions of every pixel in ``season`` (seasonal change applied)."""
    mix = np.moveaxis(compositions[scene.land_cover], -1, 0).copy()
    greenness = scene.greenness[scene.parcels, season.index]
    moved = mix[EM["crop_green"]] * (1.0 - greenness)
    mix[EM["soil"]] += moved
    mix[EM["crop_green"]] -= moved
    leaf_off = mix[EM["trees"]] * scene.deciduous * LEAF_OFF_SHARE[season.index]
    mix[EM["trees_leafoff"]] += leaf_off
    mix[EM["trees"]] -= leaf_off
    if scene.dry:
        dried = mix[EM["grass"]] * DRY_GRASS_SHARE[season.index] * 0.8
        mix[EM["grass_dry"]] += dried
        mix[EM["grass"]] -= dried
    if season.flooded.any():
        mix[:, season.flooded] = 0.0
        mix[EM["water"], season.flooded] = 0.7
        mix[EM["flooded_vegetation"], season.flooded] = 0.3
    if season.snow.any():
        mix *= 1.0 - season.snow
        mix[EM["snow"]] += season.snow
    return mix


def render_s2(rng: np.random.Generator, scene: Scene, mix: np.ndarray, season: int) -> np.ndarray:
    """(13, H, W) float32 TOA reflectance: endmember mix, per-parcel brightness, texture,
    illumination, haze, band point-spread blur and sensor noise."""
    size = mix.shape[-1]
    reflectance = np.tensordot(S2_REFLECTANCE.T, mix, axes=1)
    brightness = 1.0 + 0.06 * rng.standard_normal(scene.parcel_count).astype(np.float32)
    texture = 1.0 + 0.04 * smooth_field(rng, size, 4)
    reflectance *= (brightness[scene.parcels] * texture * ILLUMINATION[season])[None]
    reflectance += (rng.uniform(0.0, 0.03) * HAZE_PROFILE)[:, None, None]
    reflectance[10] += rng.uniform(0.0, 0.005)
    reflectance[9] *= rng.uniform(0.8, 1.2)
    for band in range(reflectance.shape[0]):
        ndimage.gaussian_filter(reflectance[band], BAND_BLUR_SIGMA[band], output=reflectance[band], mode="nearest")
    reflectance += 0.004 * rng.standard_normal(reflectance.shape, dtype=np.float32)
    return np.clip(reflectance, 0.0, 1.0)


def render_s1(rng: np.random.Generator, scene: Scene, mix: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 backscatter in dB: endmembers mixed in linear power, per-parcel
    variation, wind on water, soil moisture, incidence-angle gradient, then speckle."""
    size = mix.shape[-1]
    table = S1_BACKSCATTER_DB.copy()
    table[EM["water"]] += rng.uniform(0.0, 6.0)
    for wet in ("soil", "bare", "grass", "grass_dry"):
        table[EM[wet]] += rng.normal(0.0, 1.0)
    power = np.tensordot((10.0 ** (table / 10.0)).T, mix, axes=1)
    variation_db = rng.normal(0.0, 1.0, size=scene.parcel_count).astype(np.float32)[scene.parcels]
    gradient_db = np.linspace(-1.5, 1.5, size, dtype=np.float32) * rng.choice([-1.0, 1.0])
    power *= 10.0 ** ((variation_db + gradient_db[None, :]) / 10.0)[None]
    power = ndimage.gaussian_filter(power, sigma=(0, 0.5, 0.5), mode="nearest")
    power += 10.0 ** (SAR_NOISE_FLOOR_DB / 10.0)
    power *= rng.gamma(SPECKLE_LOOKS, 1.0 / SPECKLE_LOOKS, size=power.shape).astype(np.float32)
    return (10.0 * np.log10(power)).astype(np.float32)


def _shifted(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``labels`` moved by (dy, dx) pixels, edges replicated (a misregistration)."""
    pad = max(abs(dy), abs(dx), 1)
    padded = np.pad(labels, pad, mode="edge")
    height, width = labels.shape
    return padded[pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def _highest(priority: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the ``count`` largest finite values (all finite ones if fewer)."""
    finite = np.flatnonzero(np.isfinite(priority))
    if count >= finite.size:
        return finite
    if count <= 0:
        return np.empty(0, dtype=np.intp)
    return finite[np.argpartition(-priority[finite], count - 1)[:count]]


def noisy_labels(
    rng: np.random.Generator, scene: Scene, seasons: list[Season], noise_rate: float
) -> tuple[np.ndarray, dict[str, int]]:
    """Dynamic-World-like noisy labels (T, H, W) and the pixels each mechanism corrupted.

    Per season exactly ``round(noise_rate * H * W)`` pixels are corrupted. Each mechanism
    proposes an alternative label and a smooth priority per pixel (so errors come in
    coherent patches) and takes its quota of the budget, highest priority first, on pixels
    no earlier mechanism took; a shortfall passes on to the next one. In order
    (``docs/data.md``): missed small objects (each visible object with probability 0.6),
    boundary shifts (misregistration plus dilation of 1-2 classes; ~40 % of the budget),
    flicker (one-season confusions and labels leaking from another season; ~20 %), and
    confusion between similar classes in the same regions and parcels every season (the rest).
    """
    size = scene.base.shape[0]
    clean = np.stack([season.clean for season in seasons])
    drift = rng.integers(-2, 3, size=2)
    present = np.unique(scene.land_cover)
    dilated = rng.choice(present, size=min(len(present), int(rng.integers(1, 3))), replace=False)
    boundary_share, flicker_share, _ = rng.dirichlet([8.0, 4.0, 8.0])
    region_field, pick_field = smooth_fields(rng, size, [14, 20])
    parcel_noise = rng.standard_normal(scene.parcel_count).astype(np.float32)[scene.parcels]
    confusion_priority = 0.8 * region_field + 0.6 * parcel_noise
    partner_pick = (pick_field > 0).astype(np.intp)
    objects, object_count = ndimage.label(scene.small_objects)
    object_missed = rng.random(object_count + 1) < 0.6
    object_missed[0] = False
    missed = object_missed[objects]
    budget = round(noise_rate * size * size)
    noisy = clean.copy()
    counts = dict.fromkeys(NOISE_MECHANISMS, 0)
    for t, season in enumerate(seasons):
        labels = season.clean
        boundary_field, flicker_field, other_field = smooth_fields(rng, size, [10, 8, 16])

        missed_priority = np.where(missed & (labels == scene.land_cover), 1.0, -np.inf)

        dy, dx = drift + rng.integers(-1, 2, size=2)
        boundary = _shifted(labels, int(dy), int(dx)).copy()
        radius = int(rng.integers(1, 4))
        for cls in dilated:
            grown = ndimage.binary_dilation(labels == cls, iterations=radius) & (labels != cls)
            boundary[grown] = cls

        other_season = (t + 1 + (_uniform(other_field) * (len(seasons) - 1)).astype(np.intp)) % len(seasons)
        leaked = np.take_along_axis(clean, other_season[None], axis=0)[0]
        flicker = np.where(leaked != labels, leaked, CONFUSION_PARTNERS[labels, 1 - partner_pick])

        confusion = CONFUSION_PARTNERS[labels, partner_pick]
        if season.index == WINTER:
            confusion[labels == DW_CROPS] = WINTER_CROP_PARTNER

        proposals = (
            ("missed_small_objects", scene.base, missed_priority, budget),
            ("boundary", boundary, boundary_field, round(boundary_share * budget)),
            ("flicker", flicker, flicker_field, round(flicker_share * budget)),
            ("confusion", confusion, confusion_priority, budget),
        )
        taken = np.zeros(size * size, dtype=bool)
        remaining = budget
        for name, alternative, priority, quota in proposals:
            usable = (alternative != labels).reshape(-1) & ~taken
            chosen = _highest(np.where(usable, priority.reshape(-1), -np.inf), min(quota, remaining))
            noisy[t].reshape(-1)[chosen] = alternative.reshape(-1)[chosen]
            taken[chosen] = True
            remaining -= chosen.size
            counts[name] += chosen.size
    return noisy, counts


def s2_dates(rng: np.random.Generator, seasons: list[int]) -> list[str]:
    """One acquisition date per season, ISO format, in a random year 2019-2021."""
    year = int(rng.integers(2019, 2022))
    dates = []
    for season in seasons:
        month = int(rng.choice(SEASON_MONTHS[season]))
        dates.append(f"{year}-{month:02d}-{int(rng.integers(1, 29)):02d}")
    return dates


def synth_metadata(kind: SynthKind) -> ShardMetadata:
    """Shard metadata of synthetic data: pretraining in the released shapes and uint8, but
    holding quantised physical values (the network input puts them through the rule of
    spec 9, as it does raw data), downstream tiles as the raw products (S2 L1C uint16, S1
    float32 dB)."""
    if kind == "pretrain":
        low, high = S1_DB_RANGE
        return ShardMetadata(
            kind="pretrain",
            classes=CLASS_SCHEMES["pretrain"],
            seasons=4,
            s1=ModalitySpec(
                dtype="uint8",
                bands=S1_BAND_NAMES,
                scale=(high - low) / 255.0,
                offset=low,
                unit="dB",
                representation="physical",
            ),
            s2=ModalitySpec(
                dtype="uint8", bands=S2_BAND_NAMES, scale=1.0 / 255.0, unit="reflectance", representation="physical"
            ),
            has_clean_label=True,
        )
    return ShardMetadata(
        kind=kind,
        classes=CLASS_SCHEMES[kind],
        seasons=1,
        s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
    )


def _quantize_pretrain(s2: np.ndarray, s1_db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 storage of pretraining imagery: reflectance x 255, dB mapped from -30..5 to 0..255."""
    low, high = S1_DB_RANGE
    s2_stored = np.rint(s2 * 255.0).astype(np.uint8)
    s1_stored = np.rint((np.clip(s1_db, low, high) - low) * (255.0 / (high - low))).astype(np.uint8)
    return s2_stored, s1_stored


def synthesize_row(
    kind: SynthKind, index: int, size: int, seed: int, noise_rate: float
) -> tuple[dict[str, object], dict[str, int]]:
    """One synthetic row (location or tile) and its noise counts; depends on (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    models = SCHEME_MODELS[kind]
    compositions = composition_matrix(models)
    snow_class = _dominant_class(models, "snow")
    scene = make_scene(rng, models, size, allow_snow=snow_class is not None)
    if kind == "pretrain":
        season_ids = list(range(4))
    elif kind == "dw":
        season_ids = [int(rng.integers(0, 4))]
    else:
        season_ids = [int(rng.integers(1, 4))]
    seasons = [make_season(scene, season, models, snow_class) for season in season_ids]
    s2_list, s1_list = [], []
    for season in seasons:
        mix = abundances(scene, season, compositions)
        s2_list.append(render_s2(rng, scene, mix, season.index))
        s1_list.append(render_s1(rng, scene, mix))
    dates = s2_dates(rng, season_ids)
    if kind == "pretrain":
        s2, s1 = _quantize_pretrain(np.stack(s2_list), np.stack(s1_list))
        noisy, counts = noisy_labels(rng, scene, seasons, noise_rate)
        clean = np.stack([season.clean for season in seasons])
        row = {"id": f"{index:07d}", "dates": dates, "s1": s1, "s2": s2, "label": noisy, "clean_label": clean}
        return row, counts
    label = seasons[0].clean.copy()
    ignored_share = rng.uniform(0.01, 0.05)
    ignore_field = smooth_field(rng, size, 6)
    label[ignore_field > np.quantile(ignore_field, 1.0 - ignored_share)] = NODATA
    row = {
        "id": f"{kind}-{index:05d}",
        "dates": dates,
        "s1": s1_list[0],
        "s2": np.rint(s2_list[0] * 10000.0).astype(np.uint16),
        "label": label,
    }
    return row, {}


def synthesize(
    out_dir: str | os.PathLike[str],
    kind: SynthKind,
    locations: int,
    size: int,
    seed: int,
    noise_rate: float = 0.2,
    progress: ProgressCallback | None = None,
    *,
    overwrite: bool = False,
    target_bytes: int = 256 * 2**20,
) -> Manifest:
    """Write ``locations`` synthetic rows of ``size`` x ``size`` px as shards in ``out_dir``.

    ``kind`` 'pretrain' gives 4-season rows with noisy ``label`` and ``clean_label`` (uint8
    imagery, as released); 'dw', 'osm', 'dfc2020' give one-season tiles in that scheme with
    a few percent of ignore pixels (raw dtypes). The manifest's ``provenance`` records the
    parameters and, for pretraining, the achieved noise rate per mechanism.
    """
    if kind not in SCHEME_MODELS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(SCHEME_MODELS)}")
    if locations < 1:
        raise ValueError(f"locations must be at least 1, got {locations}")
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    meta = synth_metadata(kind)
    provenance: dict[str, object] = {
        "source": "synthetic",
        "generator": "cromss_ray.data.synth",
        "kind": kind,
        "locations": locations,
        "size": size,
        "seed": seed,
    }
    totals = dict.fromkeys(NOISE_MECHANISMS, 0)
    with ShardWriter(out_dir, meta, overwrite=overwrite, target_bytes=target_bytes, provenance=provenance) as writer:
        for index in range(locations):
            row, counts = synthesize_row(kind, index, size, seed, noise_rate)
            writer.write(row)
            for name, count in counts.items():
                totals[name] += count
            if progress is not None:
                progress(index + 1, locations)
        if kind == "pretrain":
            pixels = locations * meta.seasons * size * size
            corrupted = sum(totals.values())
            writer.provenance["noise"] = {
                "target_rate": noise_rate,
                "achieved_rate": corrupted / pixels,
                "by_mechanism": {name: count / pixels for name, count in totals.items()},
            }
        return writer.close()
