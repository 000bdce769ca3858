"""Indexing and search crop a busy photo the same way: the workers' pipeline indexes a street
photo given without a bbox, a separately built query side searches with the same photo.

Real parts: the session's stack (Valkey, Milvus Lite server over gRPC, moto S3), the workers'
Pipeline in process, the pretrained mobilenet_v2 trunk at 64 px (localiser at 224 px).
"""

from __future__ import annotations

import pytest

from cardigan.imaging.localise import localiser_for
from cardigan.ops.query import search_image
from config.settings import patched_env
from devkit.catalog import image_uri, object_key, query_photo, render_product
from encoder import build_encoder
from tests.harness import Namespace

pytestmark = pytest.mark.e2e


def test_a_busy_photo_without_bbox_is_found_by_the_same_crop(ns: Namespace) -> None:
    from workers.pipeline import Pipeline

    s = ns.set_env(
        CARDIGAN_ENCODER__BACKBONE="mobilenet_v2",
        CARDIGAN_ENCODER__WEIGHTS="IMAGENET1K_V1",
        CARDIGAN_ENCODER__RUNTIME="torch",
        CARDIGAN_ENCODER__CPU_GRAPH="false",  # eager: no trace at load (the localiser still traces its own graph)
        CARDIGAN_CROP__LOCALISER="boxhead",
    )
    photos = [query_photo(render_product(f"loc-{i}", 0, 1, seed=777)) for i in range(3)]
    events = []
    for i, photo in enumerate(photos):
        key = object_key("catalog", f"loc-{i}/0.jpg")
        ns.s3().put_object(Bucket=s.bucket, Key=key, Body=photo.data)
        # the catalog leaves the bbox out: the worker must find the product itself
        events.append({"type": "add", "product_id": f"loc-{i}", "version": 1, "images": [{"uri": image_uri(s.bucket, key)}]})
    with patched_env(ns.env):
        pipe = Pipeline(s)
        try:
            assert pipe.localiser is not None and pipe.localiser.kind == "boxhead"
            for e in events:
                assert pipe.handle(e).outcome == "applied"
        finally:
            pipe.close()
    query_side = build_encoder(s.encoder).load()  # as `cardigan search` / the service build it
    loc = localiser_for(query_side, s.crop)
    index = ns.index()
    try:
        for i, photo in enumerate(photos):
            (same,) = search_image(index, query_side, photo.data, k=1, max_pixels=s.limits.max_image_pixels, localiser=loc)
            assert same.product_id == f"loc-{i}" and same.score > 0.999  # the very same crop, the very same vector
            (centred,) = search_image(index, query_side, photo.data, k=1, max_pixels=s.limits.max_image_pixels)
            assert centred.product_id != f"loc-{i}" or centred.score < 0.999  # a centre-cropped query differs
    finally:
        index.close()
