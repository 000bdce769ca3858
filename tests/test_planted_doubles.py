"""The planted double-listing set's accounting (devkit/doubles.py): pairs the catalog drew alike
by chance are named, kept apart from the planted truth, and counted beside the false positives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from devkit import doubles
from devkit.catalog import _Look, generate_catalog
from devkit.doubles import Planted, _drawn_alike, curve, plant, same_look

PINK = _Look("skirt", "solid", (219, 103, 195), (245, 245, 240), (98, 46, 87), 23.0, 90.0)


def test_same_look_is_same_cut_pattern_and_colours_within_what_lighting_moves() -> None:
    assert same_look(PINK, replace(PINK, base=(214, 100, 190)))  # a shade a photo's light can make
    assert same_look(PINK, replace(PINK, accent=(30, 30, 35), period=40.0))  # a plain item shows no accent
    assert not same_look(PINK, replace(PINK, base=(150, 70, 133)))  # same hue, value 0.86 → 0.59: darker
    assert not same_look(PINK, replace(PINK, base=(195, 103, 219)))  # another hue
    assert not same_look(PINK, replace(PINK, category="dress"))
    assert not same_look(PINK, replace(PINK, pattern="dots"))
    dots = replace(PINK, pattern="dots")
    assert same_look(dots, replace(dots, period=26.0))
    assert not same_look(dots, replace(dots, period=30.0))  # a print's scale shows
    assert not same_look(dots, replace(dots, angle=45.0))
    assert not same_look(dots, replace(dots, accent=(30, 30, 35)))


def test_drawn_alike_pairs_leave_out_the_planted_ones() -> None:
    looks = {"a": PINK, "b": replace(PINK, base=(214, 100, 190)), "a-rephoto": PINK, "c": replace(PINK, base=(40, 40, 200))}
    alike = _drawn_alike(looks, {frozenset(("a", "a-rephoto"))})
    assert alike == {frozenset(("a", "b")), frozenset(("b", "a-rephoto"))}


def test_plant_names_pairs_drawn_alike_and_keeps_them_apart_from_the_truth(monkeypatch: pytest.MonkeyPatch) -> None:
    # two catalog products drawn with one look (small catalogs rarely draw such a pair by chance)
    drawn = doubles._look
    monkeypatch.setattr(doubles, "_look", lambda p: PINK if p.product_id in ("pr-0001", "pr-0002") else drawn(p))
    planted = plant(generate_catalog(12, seed=0, prefix="pr"), double_fraction=0.5, negative_fraction=0.3, seed=0)
    assert planted.positives and planted.negatives
    assert frozenset(("pr-0001", "pr-0002")) in planted.drawn_alike
    assert not planted.drawn_alike & (set(planted.positives) | set(planted.negatives))
    ids = {p.product_id for p in planted.products} | {f"pr-{i:04d}" for i in range(1, 13)}
    assert all(pair <= ids for pair in planted.drawn_alike)


def test_curve_counts_drawn_alike_false_positives_apart() -> None:
    planted = Planted(positives={frozenset("ab"): "edited"}, drawn_alike={frozenset("cd")})
    scores = {frozenset("ab"): 0.99, frozenset("cd"): 0.98, frozenset("ef"): 0.97}
    hi, lo = curve(scores, planted, [0.975, 0.95])
    assert (hi.tp, hi.fp, hi.fp_alike, hi.precision, hi.precision_distinct) == (1, 1, 1, 0.5, 1.0)
    assert (lo.tp, lo.fp, lo.fp_alike, round(lo.precision, 3), lo.precision_distinct) == (1, 2, 1, 0.333, 0.5)
