"""The generator's distributions (tissue HU, scanner, lesion sizes) and their named presets.

A :class:`Settings` holds every range the generator draws from; ``PRESETS`` names the
built-in ones: ``default`` (published adult head-CT values) and ``shifted`` (other tissue
values, noise, blur, slice thicknesses and lesion sizes: a second cohort for testing
generalisation across generator settings). ``--small`` keeps the preset's anatomy and
lesions and replaces only the scanner grid by a coarse one (:func:`for_scan`).
Ranges are ``(lo, hi)`` drawn uniformly per subject unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlssp_jax.errors import InputError


@dataclass(frozen=True)
class Settings:
    """Distributions of one generator setting (HU, mm, mL)."""

    name: str = "default"
    head_scale: tuple = (0.92, 1.08)      # whole-head size factor vs a mean adult head
    head_axis_jitter: float = 0.04        # extra per-axis size factor (+-)
    grey_hu: tuple = (35.0, 45.0)
    white_hu: tuple = (22.0, 32.0)
    min_grey_white_hu: float = 6.0        # grey at least this much above white
    csf_hu: tuple = (0.0, 15.0)
    scalp_hu: tuple = (20.0, 50.0)        # skin and subcutaneous tissue
    muscle_hu: tuple = (35.0, 60.0)       # face and neck soft tissue
    fat_hu: tuple = (-120.0, -70.0)       # orbital fat
    cortical_hu: tuple = (700.0, 1900.0)  # outer/inner tables, skull base
    diploe_hu: tuple = (250.0, 700.0)
    blood_hu: tuple = (50.0, 90.0)        # acute clot
    edema_hu: tuple = (10.0, 25.0)
    headrest_hu: tuple = (100.0, 400.0)
    noise_hu: tuple = (3.0, 8.0)          # Gaussian noise sigma
    blur_mm: tuple = (0.35, 0.7)          # in-plane scanner blur (Gaussian sigma)
    spacing_mm: tuple = (0.4, 1.0)        # in-plane pixel size
    slice_mm: tuple = (2.5, 3.0, 4.0, 4.5, 5.0)  # slice thicknesses to choose from
    volume_ml: tuple = (2.0, 80.0)        # hematoma volume range (truncated log-normal)
    volume_median_ml: tuple = (11.0, 17.0)  # median volume of (AVM, other) before truncation
    volume_sigma: float = 0.9             # log-normal sigma of the volume
    render_mm: float = 0.8                # phantom drawn at about this in-plane step, then
    #                                       linearly interpolated onto the scanner grid


PRESETS = {
    "default": Settings(),
    "shifted": Settings(
        name="shifted", head_scale=(0.88, 1.12), grey_hu=(30.0, 38.0), white_hu=(18.0, 27.0),
        min_grey_white_hu=4.0, csf_hu=(-5.0, 8.0), scalp_hu=(10.0, 40.0),
        muscle_hu=(30.0, 50.0), cortical_hu=(1000.0, 2200.0), diploe_hu=(400.0, 900.0),
        blood_hu=(45.0, 80.0), edema_hu=(8.0, 20.0), headrest_hu=(-300.0, 150.0),
        noise_hu=(6.0, 11.0), blur_mm=(0.6, 1.1), spacing_mm=(0.5, 0.9),
        slice_mm=(2.0, 3.5, 6.0), volume_ml=(1.5, 100.0), volume_median_ml=(15.0, 24.0),
        volume_sigma=1.0),
}

SMALL_SPACING_MM = (2.0, 3.0)  # --small: in-plane pixel size
SMALL_SLICE_MM = (5.0,)        # --small: slice thickness


def preset(name: str) -> Settings:
    """The named preset; ``InputError`` naming ``--preset`` if unknown."""
    if name not in PRESETS:
        raise InputError(f"--preset: must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def for_scan(settings: Settings, small: bool) -> Settings:
    """``settings`` with the ``--small`` coarse grid (same head, lesions and HU) if ``small``."""
    if not small:
        return settings
    return replace(settings, spacing_mm=SMALL_SPACING_MM, slice_mm=SMALL_SLICE_MM,
                   render_mm=SMALL_SPACING_MM[0])
