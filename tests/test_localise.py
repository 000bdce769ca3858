"""The crop's localiser: the real pretrained mobilenet_v2 trunk on synthetic street photos.

The trunk runs at the localiser's 224 px on 8 photos (the encoder itself at 64 px): a few
seconds on two cores. The photos are held out: other product ids and another seed than the
box head was trained on (devkit/localise_bench.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from cardigan.imaging.crop import Box, centre_box, crop_with_background, preprocess
from cardigan.imaging.localise import Localiser, head_path, heat_to_box, load_head, localiser_for, trunk_fingerprint
from config.settings import CropSettings, EncoderSettings
from devkit.catalog import query_photo, render_product
from devkit.localise_bench import iou
from encoder import Encoder, build_encoder

PRETRAINED = EncoderSettings(
    backbone="mobilenet_v2", weights="IMAGENET1K_V1", image_size=64, runtime="torch", cpu_graph=False, device="cpu"
)
LIMIT = 10_000_000


@pytest.fixture(scope="module")
def encoder() -> Iterator[Encoder]:
    yield build_encoder(PRETRAINED).load()


@pytest.fixture(scope="module")
def street() -> list[tuple[Image.Image, bytes, Box]]:
    """8 new street photos of held-out products, with the boxes the generator knows."""
    out = []
    for i in range(8):
        q = query_photo(render_product(f"loctest-{i}", 0, 1, seed=4242))
        assert q.bbox is not None
        out.append((Image.open(io.BytesIO(q.data)).convert("RGB"), q.data, q.bbox))
    return out


def _mean_iou(boxes: list[Box], street: list[tuple[Image.Image, bytes, Box]]) -> float:
    return float(np.mean([iou(b, known) for b, (_, _, known) in zip(boxes, street, strict=True)]))


def test_box_head_finds_the_product_better_than_the_centre_crop(encoder: Encoder, street: list[tuple[Image.Image, bytes, Box]]) -> None:
    loc = localiser_for(encoder, CropSettings(localiser="boxhead"))
    assert loc is not None and loc.kind == "boxhead"
    found = [loc.box(img) for img, _, _ in street]
    boxes = [b or centre_box(img.size) for b, (img, _, _) in zip(found, street, strict=True)]
    centre = _mean_iou([centre_box(img.size) for img, _, _ in street], street)
    localised = _mean_iou(boxes, street)
    assert sum(b is not None for b in found) >= 6
    assert localised > centre + 0.2, (localised, centre)
    assert sum(iou(b, known) >= 0.5 for b, (_, _, known) in zip(boxes, street, strict=True)) >= 4


def test_energy_localiser_gives_boxes_inside_the_photo(encoder: Encoder, street: list[tuple[Image.Image, bytes, Box]]) -> None:
    loc = Localiser(encoder.trunk, kind="energy", size=224)
    for img, _, _ in street[:3]:
        heat = loc.heatmap(img)
        assert heat.shape == (7, 7) and heat.min() == pytest.approx(0.0, abs=1e-5) and heat.max() == pytest.approx(1.0, abs=1e-5)
        box = loc.box(img)
        if box is not None:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height


class Counting:
    """Wraps the real localiser to count how often the crop asks it."""

    def __init__(self, loc: Localiser) -> None:
        self.loc, self.calls, self.size = loc, 0, loc.size

    def box(self, img: Image.Image) -> Box | None:
        self.calls += 1
        return self.loc.box(img)


def test_decision_order_bbox_then_trim_then_localiser_then_centre(encoder: Encoder, street: list[tuple[Image.Image, bytes, Box]]) -> None:
    loc = localiser_for(encoder, CropSettings(localiser="boxhead"))
    assert loc is not None
    counting = Counting(loc)
    img, _, known = street[0]
    crop, method, _ = crop_with_background(img, known, localiser=counting)  # bbox given: trusted, no forward pass
    assert method == "bbox" and crop.size == (known[2] - known[0], known[3] - known[1]) and counting.calls == 0
    studio = Image.new("RGB", (300, 200), (250, 250, 250))
    studio.paste((200, 30, 30), (100, 50, 180, 170))
    assert crop_with_background(studio, None, localiser=counting)[1] == "trim" and counting.calls == 0
    crop, method, _ = crop_with_background(img, None, localiser=counting)  # busy, no bbox: the localiser
    assert method == "localised" and counting.calls == 1 and crop.size != img.size
    assert crop_with_background(img, None)[1] == "centre"  # no localiser: as before
    # a localiser that finds nothing (a flat heat map) leaves the centre crop
    assert heat_to_box(np.zeros((7, 7), np.float32), img.size, 0.5) is None
    assert heat_to_box(np.ones((7, 7), np.float32), img.size, 0.5) is None  # the whole photo gains nothing


def test_queries_crop_like_indexing(encoder: Encoder, street: list[tuple[Image.Image, bytes, Box]]) -> None:
    """The worker and the search service each build their encoder from settings and ask
    localiser_for: the same photo without a bbox becomes the same tensor on both sides."""
    crop = CropSettings(localiser="boxhead")
    worker_side = encoder
    query_side = build_encoder(PRETRAINED).load()  # its own encoder, as the search service has
    _, data, _ = street[1]
    indexed, m1 = preprocess(data, None, size=64, max_pixels=LIMIT, localiser=localiser_for(worker_side, crop))
    queried, m2 = preprocess(data, None, size=64, max_pixels=LIMIT, localiser=localiser_for(query_side, crop))
    centred, m3 = preprocess(data, None, size=64, max_pixels=LIMIT)
    assert m1 == m2 == "localised" and m3 == "centre"
    assert np.array_equal(indexed.numpy(), queried.numpy())
    assert not np.allclose(indexed.numpy(), centred.numpy())
    assert localiser_for(worker_side, crop) is localiser_for(worker_side, crop)  # built once per encoder


def test_random_weights_centre_crop_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    enc = build_encoder(EncoderSettings(backbone="mobilenet_v3_small", weights="random", image_size=64, runtime="torch", cpu_graph=False))
    with caplog.at_level(logging.WARNING, logger="cardigan.imaging.localise"):
        assert localiser_for(enc, CropSettings(localiser="energy")) is None
        assert localiser_for(enc, CropSettings(localiser="energy")) is None
    assert [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()].__len__() == 1
    assert localiser_for(enc, CropSettings(localiser="none")) is None


def test_box_head_refuses_a_trunk_it_was_not_trained_on(encoder: Encoder, caplog: pytest.LogCaptureFixture) -> None:
    assert head_path("mobilenet_v2").is_file()  # ships with the code
    assert load_head("mobilenet_v2", trunk_fingerprint(encoder.trunk)) is not None
    with caplog.at_level(logging.WARNING, logger="cardigan.imaging.localise"):
        assert load_head("mobilenet_v2", "0123456789abcdef") is None  # e.g. a fine-tuned checkpoint
        assert load_head("resnet50", "0123456789abcdef") is None  # no head shipped
    text = caplog.text
    assert "fine-tuned" in text and "devkit.localise_bench train" in text and "resnet50" in text


def test_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="localiser"):
        CropSettings(localiser="yolo")  # type: ignore[arg-type]


def test_a_fine_tuned_checkpoint_keeps_the_localiser_on_the_pretrained_trunk(
    encoder: Encoder, street: list[tuple[Image.Image, bytes, Box]], tmp_path
) -> None:
    """`cardigan train` changes the trunk; the head then runs on the pristine ImageNet trunk beside it."""
    import copy

    import torch

    from encoder import save_checkpoint

    tuned = copy.deepcopy(encoder._net)
    with torch.no_grad():
        for p in list(tuned.trunk.parameters())[-4:]:
            p.add_(0.01)  # as a few fine-tuning steps would
    ckpt = tmp_path / "tuned.pt"
    save_checkpoint(tuned, ckpt)
    fine = build_encoder(PRETRAINED.model_copy(update={"weights": str(ckpt)})).load()
    assert trunk_fingerprint(fine.trunk) != trunk_fingerprint(encoder.trunk)
    loc = localiser_for(fine, CropSettings(localiser="boxhead"))
    assert loc is not None, "a fine-tuned encoder lost its localiser"
    ref = localiser_for(encoder, CropSettings(localiser="boxhead"))
    assert ref is not None
    assert [loc.box(img) for img, _, _ in street] == [ref.box(img) for img, _, _ in street]
