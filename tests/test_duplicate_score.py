"""Double-listing scoring (pure): the colour signature and how it bends the cosine."""

from __future__ import annotations

import numpy as np
import pytest

from cardigan.duplicates import signature
from cardigan.duplicates.score import Scoring, best_pairs, image_score
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
    assert Scoring.from_settings(DuplicateSettings(threshold=0.99, vector_threshold=0.9725)).unsigned_penalty == 0.0
