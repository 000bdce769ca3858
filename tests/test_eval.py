"""``cardigan eval``: the metrics on hand-built cases, and real encoders on the real sets (small)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cardigan.cli import app
from cardigan.ops.evaluate import EvalError, Item, junk_mask, retrieval_metrics
from devkit.evalsets import near_duplicates


def test_metrics_on_a_hand_built_case() -> None:
    gallery = ["a", "a", "b", "c"]
    sims = np.array(
        [
            [0.9, 0.2, 0.5, 0.1],  # truth a: a first (recall@1); a's photos at ranks 1 and 3: AP (1 + 2/3) / 2
            [0.8, 0.1, 0.7, 0.75],  # truth b: products a .8, c .75, b .7 → third; b's photo at rank 3: AP 1/3
        ]
    )
    recall, mean_ap = retrieval_metrics(sims, ["a", "b"], gallery, ks=(1, 2, 3))
    assert recall == {1: 0.5, 2: 0.5, 3: 1.0}
    assert mean_ap == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_ties_count_against_the_query_and_junk_is_ignored() -> None:
    # every score equal: the right product is not first (a constant encoder must not score 1.0)
    recall, mean_ap = retrieval_metrics(np.ones((1, 3)), ["a"], ["a", "b", "c"], ks=(1, 3))
    assert recall == {1: 0.0, 3: 1.0} and mean_ap == pytest.approx(1 / 3)
    # a distractor cut from the query's own photo ranks first, but it is junk for that query
    queries = [Item(b"", None, "x", "x")]
    gallery = [Item(b"", None, "x#part0", "x"), Item(b"", None, "x", "x"), Item(b"", None, "y", "y")]
    junk = junk_mask(queries, gallery)
    assert junk.tolist() == [[True, False, False]]
    sims = np.array([[0.99, 0.9, 0.5]])
    assert retrieval_metrics(sims, ["x"], [g.label for g in gallery], junk, ks=(1,)) == ({1: 1.0}, 1.0)
    assert retrieval_metrics(sims, ["x"], [g.label for g in gallery], None, ks=(1,)) == ({1: 0.0}, 0.5)
    with pytest.raises(EvalError, match="labelled 'z', which has no photo in the gallery"):
        retrieval_metrics(sims, ["z"], [g.label for g in gallery])


def test_near_duplicate_set_is_real_photos_and_deterministic() -> None:
    a, b = near_duplicates(), near_duplicates()
    assert [q.data for q in a.queries] == [q.data for q in b.queries]
    labels = {g.label for g in a.gallery}
    originals = {g.label for g in a.gallery if "#part" not in g.label}
    assert "skimage:astronaut" in originals and len(originals) >= 15
    assert {q.label for q in a.queries} == originals and labels > originals  # distractors are wrong answers


def test_cli_scores_pretrained_above_random_and_prints_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDIGAN_ENCODER__RUNTIME", "torch")  # small sizes: no ONNX export needed
    args = ["eval", "--json", "--image-size", "64", "--products", "6"]
    args += ["-w", "mobilenet_v3_small:random", "-w", "mobilenet_v2:IMAGENET1K_V1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["crop"] == "given" and set(data["sets"]) == {"street2shop", "neardup"}
    rows = {(r["set"], r["encoder"]): r for r in data["scores"]}
    assert set(rows) == {(s, e) for s in ("street2shop", "neardup") for e in ("mobilenet_v3_small:random", "mobilenet_v2:IMAGENET1K_V1")}
    for r in rows.values():
        assert {"recall@1", "recall@5", "mAP", "queries", "gallery", "products", "model_version"} <= set(r)
        assert 0 <= r["recall@1"] <= r["recall@5"] <= 1 and 0 < r["mAP"] <= 1
    assert rows["street2shop", "mobilenet_v2:IMAGENET1K_V1"]["queries"] == 6
    rand, pre = rows["neardup", "mobilenet_v3_small:random"], rows["neardup", "mobilenet_v2:IMAGENET1K_V1"]
    assert pre["model_version"].startswith("mobilenet_v2-IMAGENET1K_V1-") and rand["model_version"].startswith("mobilenet_v3_small-random-")
    assert pre["recall@1"] >= rand["recall@1"] + 0.2 and pre["mAP"] > rand["mAP"], (pre, rand)


def test_bad_options_fail_clearly() -> None:
    res = CliRunner().invoke(app, ["eval", "--crop", "sideways"])
    assert res.exit_code == 2 and "--crop must be one of given, centre, localise" in res.output
    res = CliRunner().invoke(app, ["eval", "-w", "NO_SUCH_WEIGHTS", "--set", "neardup"])
    assert res.exit_code == 2 and "unknown weights 'NO_SUCH_WEIGHTS'" in res.output
    res = CliRunner().invoke(app, ["eval", "--set", "nonsense", "-w", "random"])
    assert res.exit_code == 2 and "unknown eval set 'nonsense'" in res.output


def test_localise_finds_the_product_where_the_centre_crop_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Street photos without their box: the workers' localiser against the trim/centre fallback."""
    monkeypatch.setenv("CARDIGAN_ENCODER__RUNTIME", "torch")
    maps = {}
    for crop in ("centre", "localise"):
        args = ["eval", "--json", "--set", "street2shop", "--image-size", "128", "--products", "16", "--crop", crop]
        res = CliRunner().invoke(app, [*args, "-w", "mobilenet_v2:IMAGENET1K_V1"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout.strip().splitlines()[-1])
        assert data["crop"] == crop
        maps[crop] = data["scores"][0]["mAP"]
    assert maps["localise"] > maps["centre"] + 0.1, maps
    res = CliRunner().invoke(
        app, ["eval", "--set", "street2shop", "--products", "4", "--image-size", "64", "--crop", "localise", "-w", "random"]
    )
    assert res.exit_code == 2 and "no localiser" in res.output, res.output
