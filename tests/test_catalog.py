"""The synthetic catalog: reproducible, valid, and similar where it should be."""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from cardigan.event import parse_event
from devkit.catalog import (
    CATEGORIES,
    MAX_IMAGES,
    MAX_SIDE,
    MIN_SIDE,
    Scenario,
    SyntheticImage,
    SyntheticProduct,
    build_scenario,
    file_uri,
    generate_catalog,
    image_uri,
    object_key,
    query_photo,
    render_product,
    upload,
    write_to_folder,
)

ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def catalog() -> list[SyntheticProduct]:
    return generate_catalog(30, seed=5)


@pytest.fixture(scope="module")
def scenario(catalog: list[SyntheticProduct]) -> Scenario:
    return build_scenario(catalog, "bkt", seed=4)


def _decode(img: SyntheticImage) -> Image.Image:
    with Image.open(io.BytesIO(img.data)) as im:
        assert im.format == "JPEG"
        return im.convert("RGB")


# --------------------------------------------------------------------------- products


def test_same_seed_same_bytes_whatever_the_thread_count() -> None:
    a = generate_catalog(6, seed=11, workers=1)
    b = generate_catalog(6, seed=11, workers=2)
    assert [p.images for p in a] == [p.images for p in b]
    c = generate_catalog(6, seed=12)
    assert [i.data for p in a for i in p.images] != [i.data for p in c for i in p.images]


def test_ids_photos_and_keys_are_valid(catalog: list[SyntheticProduct]) -> None:
    assert [p.product_id for p in catalog] == [f"demo-{i:04d}" for i in range(1, 31)]
    keys = [img.key for p in catalog for img in p.images]
    assert len(keys) == len(set(keys))
    for p in catalog:
        assert ID_RE.match(p.product_id)
        assert p.category in CATEGORIES
        assert p.variant == 0
        assert 1 <= len(p.images) <= MAX_IMAGES
        for n, img in enumerate(p.images):
            assert img.key == f"{p.product_id}/{n}.jpg"
            im = _decode(img)
            assert MIN_SIDE <= im.width <= MAX_SIDE and MIN_SIDE <= im.height <= MAX_SIDE
            if img.bbox is not None:
                x0, y0, x1, y1 = img.bbox
                assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
    # the mix the pipeline must handle: several categories, busy scenes with a bbox, plain ones without
    assert len({p.category for p in catalog}) >= 4
    bboxes = Counter(img.bbox is not None for p in catalog for img in p.images)
    assert bboxes[True] >= 3 and bboxes[False] >= 3
    assert len({len(p.images) for p in catalog}) >= 3


def test_prefix_is_validated() -> None:
    assert generate_catalog(1, prefix="sku_a.b")[0].product_id == "sku_a.b-0001"
    with pytest.raises(ValueError):
        generate_catalog(1, prefix="bad id")


def _centre_hist(img: SyntheticImage) -> np.ndarray:
    """Colour histogram of the photo's centre (inside the bbox when there is one)."""
    im = _decode(img)
    if img.bbox is not None:
        im = im.crop(img.bbox)
    w, h = im.size
    a = np.asarray(im.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)).resize((32, 32))) // 64
    hist = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64).astype(float)
    return hist / hist.sum()


def test_photos_of_one_product_are_more_alike_than_photos_of_two(catalog: list[SyntheticProduct]) -> None:
    """Similarity must mean something even before an encoder is trained."""
    ids = np.array([p.product_id for p in catalog for _ in p.images])
    feats = np.stack([_centre_hist(img) for p in catalog for img in p.images])
    dist = np.abs(feats[:, None] - feats[None]).sum(-1)
    same = ids[:, None] == ids[None]
    eye = np.eye(len(ids), dtype=bool)
    intra, inter = dist[same & ~eye].mean(), dist[~same].mean()
    assert intra < 0.85 * inter, (intra, inter)
    # and the nearest other photo is a sibling far more often than chance (~3 %)
    np.fill_diagonal(dist, np.inf)
    has_sibling = (same & ~eye).any(1)
    nn_same = (ids[dist.argmin(1)] == ids)[has_sibling].mean()
    assert nn_same > 0.25, nn_same


def test_a_new_variant_is_a_new_look_of_the_same_product() -> None:
    v0 = render_product("sku-1", 0, 2, seed=3)
    v1 = render_product("sku-1", 1, 3, seed=3)
    assert v1.category == v0.category
    assert [i.key for i in v1.images] == ["sku-1/v1/0.jpg", "sku-1/v1/1.jpg", "sku-1/v1/2.jpg"]
    assert {i.data for i in v0.images}.isdisjoint({i.data for i in v1.images})
    assert render_product("sku-1", 1, 3, seed=3).images == v1.images
    with pytest.raises(ValueError):
        render_product("sku-1", 0, MAX_IMAGES + 1)
    with pytest.raises(ValueError):
        render_product("sku-1", 0, 1, category="hat")


def test_query_photo_is_fresh_reproducible_and_has_a_bbox(catalog: list[SyntheticProduct]) -> None:
    p = catalog[0]
    q = query_photo(p)
    assert q == query_photo(p)
    assert q.bbox is not None
    assert q.data not in {i.data for i in p.images}
    assert query_photo(p, 1).data != q.data
    _decode(q)


# --------------------------------------------------------------------------- storage


def test_uris_and_keys() -> None:
    assert object_key("catalog/", "a-1/0.jpg") == "catalog/a-1/0.jpg"
    assert object_key("", "a-1/0.jpg") == "a-1/0.jpg"
    assert image_uri("bkt", "catalog/a-1/0.jpg") == "s3://bkt/catalog/a-1/0.jpg"
    uri = file_uri("/tmp/x y", "catalog/a-1/0.jpg")
    assert uri.startswith("file:///") and unquote(uri[7:]) == "/tmp/x y/catalog/a-1/0.jpg"


def test_upload_puts_every_photo_in_s3(catalog: list[SyntheticProduct]) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bkt")
        n = upload(catalog[:5], s3, "bkt", prefix="imgs")
        listed = s3.list_objects_v2(Bucket="bkt", Prefix="imgs/")["Contents"]
        assert n == len(listed) == sum(len(p.images) for p in catalog[:5])
        first = catalog[0].images[0]
        body = s3.get_object(Bucket="bkt", Key=f"imgs/{first.key}")["Body"].read()
        assert body == first.data


# --------------------------------------------------------------------------- scenario


def test_scenario_ends_in_the_highest_version_of_every_product(catalog: list[SyntheticProduct], scenario: Scenario) -> None:
    sc = scenario
    ids = {p.product_id for p in catalog}
    assert set(sc.expected) == ids
    n = len(ids)
    # all adds first, then the wave
    assert next(i for i, e in enumerate(sc.events) if e["type"] != "add") >= n
    by_pid: dict[str, list[dict]] = defaultdict(list)
    for e in sc.events:
        by_pid[e["product_id"]].append(e)
        parse_event(e, max_images=MAX_IMAGES)  # the worker's own contract accepts every event
    for pid, evs in by_pid.items():
        last = max(evs, key=lambda e: e["version"])
        exp = sc.expected[pid]
        versions = sorted({e["version"] for e in evs})
        assert versions == list(range(1, versions[-1] + 1))  # add=1, then +1 per change
        assert all(e["type"] == "add" for e in evs if e["version"] == 1)
        if exp is None:
            assert last["type"] == "delete" and last["images"] == []
        else:
            assert last["type"] in ("add", "modify")
            assert exp.version == last["version"]
            assert exp.uris == tuple(i["uri"] for i in last["images"])
            assert 1 <= exp.n_images <= MAX_IMAGES
            assert exp.product.product_id == pid and len(exp.product.images) == exp.n_images
    counts = Counter(e["type"] for e in sc.events)
    assert counts["modify"] >= round(0.2 * n) and counts["delete"] >= round(0.1 * n)
    assert sum(v is None for v in sc.expected.values()) == round(0.1 * n)
    assert len(sc.live) == n - round(0.1 * n)


def test_scenario_has_duplicates_and_stale_events_that_must_not_win(scenario: Scenario) -> None:
    sc = scenario
    seen = Counter(repr(e) for e in sc.events)
    assert sc.duplicates >= 1 and any(c > 1 for c in seen.values())
    newest_seen: dict[str, int] = {}
    late = []
    for e in sc.events:
        pid = e["product_id"]
        if e["version"] < newest_seen.get(pid, 0):
            late.append(e)
        newest_seen[pid] = max(newest_seen.get(pid, 0), e["version"])
    assert sc.stale >= 1 and len(late) >= sc.stale
    for e in late:  # every late arrival is older than where its product must end
        exp = sc.expected[e["product_id"]]
        final = max(x["version"] for x in sc.events if x["product_id"] == e["product_id"])
        assert e["version"] < final
        assert exp is None or exp.version == final
    # a delete that arrives before an older modify or add: the tombstone case
    assert any(sc.expected[e["product_id"]] is None for e in late)
    # events are independent dicts: a consumer mutating one cannot change another
    ids = [id(e) for e in sc.events] + [id(e["attributes"]) for e in sc.events] + [id(i) for e in sc.events for i in e["images"]]
    assert len(ids) == len(set(ids))


def test_scenario_is_deterministic_and_small_catalogs_work() -> None:
    products = generate_catalog(3, seed=1)
    a = build_scenario(products, "bkt", seed=9)
    b = build_scenario(products, "bkt", seed=9)
    assert a.events == b.events and a.expected == b.expected
    only_adds = build_scenario(products, "bkt", modify_fraction=0, delete_fraction=0)
    assert {e["type"] for e in only_adds.events} == {"add"}
    assert all(v is not None and v.version == 1 for v in only_adds.expected.values())
    assert build_scenario([], "bkt").events == []
    with pytest.raises(ValueError):
        build_scenario(products, "bkt", uri_style="http")  # type: ignore[arg-type]


def test_file_scenario_points_at_files_that_exist(tmp_path: Path, catalog: list[SyntheticProduct]) -> None:
    products = catalog[:8]
    sc = build_scenario(products, tmp_path, uri_style="file", seed=1, modify_fraction=0.5)
    assert sc.uploads, "modifies need new photos"
    written = write_to_folder([*products, *sc.uploads], tmp_path)
    assert written == sum(len(p.images) for p in [*products, *sc.uploads])
    for e in sc.events:
        for ref in e["images"]:
            assert ref["uri"].startswith("file:///")
            path = Path(unquote(ref["uri"][len("file://") :]))
            assert path.is_file() and path.is_relative_to(tmp_path.resolve())
