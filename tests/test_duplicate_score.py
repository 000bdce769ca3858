"""Double-listing scoring (pure): the colour signature and how it bends the cosine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cardigan.duplicates import signature, structure
from cardigan.duplicates.score import Scoring, best_pairs, forgiven, image_score
from config.settings import DuplicateSettings


def _crop(rgb: tuple[int, int, int], accent: tuple[int, int, int] = (245, 245, 240), period: int = 16) -> np.ndarray:
    """A striped item filling a 224 px crop."""
    px = np.empty((224, 224, 3), np.uint8)
    px[:] = rgb
    px[:, (np.arange(224) // period) % 2 == 1] = accent
    return px


def _lit(px: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(px.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _row(pid: str, i: int, sig: np.ndarray | None, version: int = 1) -> dict:
    crop: dict = {"bbox": None} if sig is None else {"bbox": None, signature.SIG_KEY: signature.encode(sig)}
    return {"product_id": pid, "image_index": i, "version": version, "crop": crop}


def test_signature_ignores_brightness_but_not_hue() -> None:
    red = _crop((200, 40, 40))
    same = signature.colour_signature(red)
    assert same.shape == (signature.SIG_LEN,) and same.dtype == np.float32
    assert np.array_equal(same, signature.colour_signature(red.copy()))  # deterministic
    darker = np.linalg.norm(same - signature.colour_signature(_lit(red, 0.8)))
    recolour = np.linalg.norm(same - signature.colour_signature(_crop((40, 40, 200))))
    assert darker < 0.02 < 0.2 < recolour
    with pytest.raises(ValueError):
        signature.colour_signature(red[..., 0])


def test_signature_round_trips_and_bad_ones_read_as_missing() -> None:
    sig = signature.colour_signature(_crop((30, 160, 90)))
    raw = signature.encode(sig)
    assert isinstance(raw, str) and len(raw) == 16
    assert np.allclose(signature.decode(raw), sig, atol=1e-3)
    for bad in (None, 3, "", "!!!!", signature.encode(np.zeros(5)), signature.encode(np.array([np.inf] * 6))):
        assert signature.decode(bad) is None
    assert signature.of_row({"crop": {"bbox": None}}) is None and signature.of_row({}) is None
    assert signature.of_row({"crop": {"bbox": None, "sig": raw}}) is not None


def test_image_score_subtracts_the_colour_distance_or_the_unsigned_penalty() -> None:
    a, b = np.zeros(6, np.float32), np.full(6, 0.1, np.float32)
    s = Scoring(colour_weight=2.0, unsigned_penalty=0.03)
    assert image_score(0.98, a, b, s) == pytest.approx(0.98 - 2.0 * np.sqrt(6 * 0.01))
    assert image_score(0.98, a, a, s) == pytest.approx(0.98)
    assert image_score(0.98, a, None, s) == image_score(0.98, None, None, s) == pytest.approx(0.95)


def test_best_pairs_prefers_the_same_colours_and_keeps_the_evidence() -> None:
    red, blue = signature.colour_signature(_crop((200, 40, 40))), signature.colour_signature(_crop((40, 40, 200)))
    rows = [_row("a", 0, red, 3), _row("a", 1, blue, 3)]
    hits = [
        [{**_row("a", 1, blue, 3), "score": 0.99}, {**_row("b", 2, red, 7), "score": 0.95}, {**_row("c", 0, blue, 1), "score": 0.99}],
        [{**_row("b", 0, red, 7), "score": 0.97}, {**_row("d", 0, None, 1), "score": 0.97}],
    ]
    best = best_pairs(rows, hits, Scoring(colour_weight=1.0, unsigned_penalty=0.02), at=0.0)["a"]
    assert set(best) == {"b", "c", "d"}  # never the product itself
    # b: the same-colour pair (0.95) beats the higher cosine across colours (0.97 - distance)
    ab = best["b"]
    assert (ab.score, ab.a_image, ab.b_image, ab.a_version, ab.b_version) == (0.95, 0, 2, 3, 7)
    assert best["c"].score < 0.8  # a red image's hit on a blue product
    assert best["d"].score == pytest.approx(0.95)  # no signature: the cosine less the penalty


def test_settings_make_unsigned_pairs_clear_the_vector_threshold() -> None:
    d = DuplicateSettings(threshold=0.93, vector_threshold=0.9725, colour_weight=1.5)
    s = Scoring.from_settings(d)
    assert s.colour_weight == 1.5 and s.unsigned_penalty == pytest.approx(0.0425)
    d = DuplicateSettings(structure_slack=0.03, structure_floor=0.8)
    assert (Scoring.from_settings(d).structure_slack, Scoring.from_settings(d).structure_floor) == (0.03, 0.8)
    assert Scoring.from_settings(DuplicateSettings(threshold=0.99, vector_threshold=0.9725)).unsigned_penalty == 0.0


def _blobs(seed: int) -> np.ndarray:
    """A 224 px crop of smooth random patches of colour (a print on a garment, folds and all)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(30, 225, size=(14, 14, 3)).astype(np.uint8))
    return np.asarray(coarse.resize((224, 224), Image.Resampling.BICUBIC))


def _relit(px: np.ndarray, contrast: float, gains: tuple[float, float, float]) -> np.ndarray:
    """The generator's relighting: contrast around the mean grey, then a gain per channel."""
    f = px.astype(np.float32)
    f = (f - f.mean()) * contrast + f.mean()
    return np.clip(f * np.array(gains, np.float32), 0, 255).astype(np.uint8)


def test_structure_ignores_lighting_and_small_shifts_but_not_another_layout() -> None:
    px = _blobs(1)
    st = structure.structure(px)
    assert st.shape == (structure.GRID, structure.GRID) and st.dtype == np.int8
    assert np.array_equal(st, structure.structure(px.copy()))  # deterministic
    relit = structure.correlation(st, structure.structure(_relit(px, 1.2, (1.06, 1.0, 0.94))))
    # a copy cropped a little differently: shifts of whole cells (11 px here) are searched, so one
    # and two cells line up again although the same cells no longer correlate; a few pixels cost little
    cell = round(224 * 0.8 / structure.CELLS)
    moved = [structure.structure(np.roll(px, (k, -k), axis=(0, 1))) for k in (cell, 2 * cell, 3)]
    window = slice(structure.PAD, structure.PAD + structure.CELLS)
    assert abs(np.corrcoef(st[window, window].ravel(), moved[0][window, window].ravel())[0, 1]) < 0.3
    assert min(structure.correlation(st, m) for m in moved[:2]) > 0.95 and structure.correlation(st, moved[2]) > 0.8
    others = [structure.correlation(st, structure.structure(_blobs(s))) for s in range(2, 8)]
    assert relit > 0.99 and max(others) < 0.4
    assert structure.correlation(st, st) == pytest.approx(1.0, abs=1e-5)
    flat = structure.structure(np.full((224, 224, 3), 128, np.uint8))
    assert not flat.any() and structure.correlation(st, flat) == 0.0  # nothing to compare: no evidence
    with pytest.raises(ValueError):
        structure.structure(px[..., 0])


def test_structure_round_trips_and_bad_ones_read_as_missing() -> None:
    st = structure.structure(_blobs(3))
    raw = structure.encode(st)
    assert isinstance(raw, str) and len(raw) == 4 * -(-(structure.GRID**2) // 3)
    assert np.array_equal(structure.decode(raw), st)
    for bad in (None, 3, "", "!!!!", structure.encode(np.zeros(5, np.int8))):
        assert structure.decode(bad) is None
    assert structure.of_row({"crop": {"bbox": None}}) is None and structure.of_row({}) is None
    assert np.array_equal(structure.of_row({"crop": {"bbox": None, "st": raw}}), st)


def test_a_matching_structure_forgives_some_colour_distance_never_more() -> None:
    a, b = np.zeros(6, np.float32), np.full(6, 0.02, np.float32)  # distance 0.049: a relit copy's
    far = np.full(6, 0.08, np.float32)  # distance 0.196: the same design in another colour
    st = structure.structure(_blobs(1))
    same, other = structure.structure(_relit(_blobs(1), 0.8, (0.95, 1.0, 1.05))), structure.structure(_blobs(2))
    s = Scoring(colour_weight=1.2, structure_slack=0.04, structure_floor=0.9)
    d = float(np.linalg.norm(a - b))
    colour_only = image_score(0.98, a, b, s)
    assert colour_only == pytest.approx(0.98 - 1.2 * d)  # no descriptors: the colour score
    assert image_score(0.98, a, b, s, st, None) == pytest.approx(colour_only)
    r = structure.correlation(st, same)
    relief = 0.04 * min(1.0, (r - 0.9) / 0.1)
    assert relief > 0.035
    assert image_score(0.98, a, b, s, st, same) == pytest.approx(0.98 - 1.2 * (d - relief))
    assert image_score(0.98, a, b, s, st, other) == pytest.approx(colour_only)  # another layout: nothing forgiven
    # the other colour keeps most of its penalty; a near-identical pair is capped at its cosine
    assert image_score(0.98, a, far, s, st, same) < 0.98 - 1.2 * 0.15
    assert image_score(0.98, a, a + 0.001, s, st, same) == pytest.approx(0.98)
    assert image_score(0.98, a, b, replace(s, structure_slack=0.0), st, same) == pytest.approx(colour_only)
    assert forgiven(0.95, s) == pytest.approx(0.02) and forgiven(0.9, s) == 0.0 and forgiven(1.0, s) == pytest.approx(0.04)


def test_best_pairs_reads_the_structure_from_the_rows() -> None:
    px = _blobs(4)
    sig, st = signature.colour_signature(px), structure.structure(px)
    warm = _relit(px, 1.15, (1.06, 1.0, 0.92))
    wsig, wst = signature.colour_signature(warm), structure.structure(warm)

    def row(pid: str, g: np.ndarray, t: np.ndarray | None) -> dict:
        r = _row(pid, 0, g)
        if t is not None:
            r["crop"][structure.ST_KEY] = structure.encode(t)
        return r

    s = Scoring(colour_weight=1.2, structure_slack=0.05, structure_floor=0.9)
    hits = [[{**row("copy", wsig, wst), "score": 0.97}, {**row("old", wsig, None), "score": 0.97}]]
    best = best_pairs([row("a", sig, st)], hits, s, at=0.0)["a"]
    d = float(np.linalg.norm(sig - wsig))
    assert d > 0.01
    assert best["old"].score == pytest.approx(0.97 - 1.2 * d, abs=1e-3)  # a row from before: the colour score
    assert best["copy"].score > best["old"].score + 1.2 * min(d, 0.04)


def test_best_pairs_keeps_only_pairs_above_min_score_and_the_shortcut_changes_no_kept_score() -> None:
    px = _blobs(6)
    st = structure.encode(structure.structure(px))
    other_st = structure.encode(structure.structure(_blobs(7)))

    def row(pid: str, shift: float, t: str) -> dict:
        return {
            "product_id": pid,
            "image_index": 0,
            "version": 1,
            "crop": {"sig": signature.encode(np.full(6, 0.3 + shift, np.float32)), "st": t},
        }

    s = Scoring(colour_weight=1.2, structure_slack=0.05, structure_floor=0.93)
    me = row("a", 0.0, st)
    hits = [
        [
            {**row("relit", 0.016, st), "score": 0.97},  # distance 0.039: forgiven, 0.97
            {**row("alike", 0.016, other_st), "score": 0.97},  # same distance, another layout: 0.923
            {**row("far", 0.1, st), "score": 0.99},  # distance 0.245: 0.99 - 1.2 * 0.195 even forgiven
            {**row("same", 0.0, other_st), "score": 0.95},  # the same colours: 0.95
        ]
    ]
    every = best_pairs([me], hits, s)["a"]
    kept = best_pairs([me], hits, s, min_score=0.94)["a"]
    assert set(every) == {"relit", "alike", "far", "same"} and set(kept) == {"relit", "same"}
    assert all(kept[k].score == every[k].score for k in kept)
    assert every["relit"].score == pytest.approx(0.97, abs=1e-3) and every["alike"].score < 0.93
