"""The colour axis (cardigan/duplicates/axis.py) and how the score uses it: blind to a photo's
exposure and contrast, not to another shade or hue; the smaller of two colour charges."""

from __future__ import annotations

import numpy as np
import pytest

from cardigan.duplicates import axis, signature, structure
from cardigan.duplicates.score import Scoring, best_pairs, image_score
from config.settings import DuplicateSettings


def _shaded(rgb: tuple[int, int, int]) -> np.ndarray:
    """A plain item filling a 224 px crop, lit from above (its shading runs along its colour)."""
    light = np.linspace(0.55, 1.0, 224, dtype=np.float32)[:, None, None]
    return np.clip(np.array(rgb, np.float32) * light * np.ones((224, 224, 3), np.float32), 0, 255).astype(np.uint8)


def _relit(px: np.ndarray, exposure: float, contrast: float) -> np.ndarray:
    """Contrast around the crop's mean grey, then an exposure gain: grey added, then scaled."""
    f = px.astype(np.float32)
    return np.clip(((f - f.mean()) * contrast + f.mean()) * exposure, 0, 255).astype(np.uint8)


def test_axis_ignores_exposure_and_contrast_but_not_another_shade_or_hue() -> None:
    pink = _shaded((210, 60, 150))
    ax = axis.colour_axis(pink)
    assert ax is not None and ax.shape == (3,) and ax.dtype == np.float32
    assert np.linalg.norm(ax) == pytest.approx(1.0, abs=1e-4)
    relit = _relit(pink, 1.15, 0.8)
    # the signature (chromaticity) moves with the grey that contrast adds; the axis does not
    assert np.linalg.norm(signature.colour_signature(pink) - signature.colour_signature(relit)) > 0.03
    assert axis.distance(ax, axis.colour_axis(relit)) < 0.02
    assert axis.distance(ax, axis.colour_axis(_relit(pink, 0.85, 1.2))) < 0.02
    assert axis.distance(ax, axis.colour_axis(_shaded((210, 120, 170)))) > 0.15  # a paler shade of the hue
    assert axis.distance(ax, axis.colour_axis(_shaded((60, 150, 210)))) > 0.4  # another hue
    assert axis.distance(ax, -ax) == 0.0  # a direction has no sign


def test_a_flat_crop_has_no_axis_and_a_wrong_shape_is_refused() -> None:
    flat = np.full((224, 224, 3), (120, 40, 40), np.uint8)
    assert axis.colour_axis(flat) is None
    with pytest.raises(ValueError, match="S×S×3"):
        axis.colour_axis(flat[..., 0])


def test_axis_round_trips_and_bad_ones_read_as_missing() -> None:
    ax = axis.colour_axis(_shaded((30, 160, 90)))
    assert ax is not None
    raw = axis.encode(ax)
    assert isinstance(raw, str) and len(raw) == 8
    assert axis.distance(axis.decode(raw), ax) < 1e-3
    for bad in (None, 3, "", "!!!!", axis.encode(np.zeros(2)), axis.encode(np.array([np.inf] * 3)), axis.encode(np.zeros(3))):
        assert axis.decode(bad) is None
    assert axis.of_row({"crop": {"bbox": None}}) is None and axis.of_row({}) is None
    assert axis.of_row({"crop": {"bbox": None, axis.AX_KEY: raw}}) is not None


def test_image_score_charges_the_smaller_of_the_signature_and_the_axis() -> None:
    a, b = np.zeros(6, np.float32), np.full(6, 0.1 / np.sqrt(6), np.float32)  # signature distance 0.1
    x = np.array([1.0, 0.0, 0.0], np.float32)
    near, far = np.array([0.9988, 0.05, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    s = Scoring(colour_weight=1.2, axis_weight=0.6)
    assert image_score(0.98, a, b, s, ax_a=x, ax_b=near) == pytest.approx(0.98 - 0.6 * axis.distance(x, near))  # ~0.03
    assert image_score(0.98, a, b, s, ax_a=x, ax_b=far) == pytest.approx(0.98 - 0.12)  # the signature's is smaller
    assert image_score(0.98, a, b, s, ax_a=x, ax_b=None) == pytest.approx(0.98 - 0.12)  # one side without an axis
    assert image_score(0.98, a, b, Scoring(colour_weight=1.2), ax_a=x, ax_b=near) == pytest.approx(0.98 - 0.12)  # weight 0: off
    assert image_score(0.98, None, b, s, ax_a=x, ax_b=near) == pytest.approx(0.98)  # unsigned rows: as before
    assert Scoring.from_settings(DuplicateSettings()).axis_weight == DuplicateSettings().axis_weight > 0
    assert Scoring.from_settings(DuplicateSettings(axis_weight=0.4)).axis_weight == 0.4


def test_best_pairs_reads_the_axes_and_the_shortcut_changes_no_kept_score() -> None:
    pink = _shaded((210, 60, 150))
    relit = _relit(pink, 1.15, 0.75)
    paler = _shaded((210, 120, 170))

    def row(pid: str, px: np.ndarray, with_axis: bool = True) -> dict:
        crop = {"bbox": None, signature.SIG_KEY: signature.encode(signature.colour_signature(px))}
        crop[structure.ST_KEY] = structure.encode(structure.structure(px))
        if with_axis:
            crop[axis.AX_KEY] = axis.encode(axis.colour_axis(px))
        return {"product_id": pid, "image_index": 0, "version": 1, "crop": crop}

    s = Scoring.from_settings(DuplicateSettings())
    me = row("a", pink)
    hits = [
        [
            {**row("relit", relit), "score": 0.975},
            {**row("old", relit, with_axis=False), "score": 0.975},
            {**row("paler", paler), "score": 0.975},
        ]
    ]
    every = best_pairs([me], hits, s)["a"]
    kept = best_pairs([me], hits, s, min_score=0.94)["a"]
    # a relit copy: the axes carry it over the threshold; the same row without an axis (indexed
    # before axes existed) scores by the signature and the structure alone, as before
    assert every["relit"].score > 0.96 > 0.94 > every["old"].score
    assert every["paler"].score < 0.94  # another shade: neither colour cue agrees
    assert set(kept) == {"relit"} and kept["relit"].score == every["relit"].score
