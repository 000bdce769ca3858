"""The shipped ImageNet file lands where torchvision's weights API finds it, with no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

from encoder import offline_weights


@pytest.fixture()
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_ensure_links_the_shipped_mobilenet_v2_and_torchvision_loads_it(torch_home: Path) -> None:
    url = models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    path = offline_weights.ensure_for_url(url)
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert path.is_file()
    # the standard API, no download: the same tensors as the shipped file
    net = models.mobilenet_v2(weights=models.MobileNet_V2_Weights.IMAGENET1K_V1)
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(net.state_dict()["features.0.0.weight"], shipped["features.0.0.weight"])
    # a second call finds the cached file
    assert offline_weights.ensure_for_url(url) == path


def test_unknown_file_is_not_invented(torch_home: Path) -> None:
    assert offline_weights.ensure("resnet50-0676ba61.pth") is None
    assert not (torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth").exists()


def test_digest_must_match_the_name(tmp_path: Path) -> None:
    f = tmp_path / "x.pth"
    f.write_bytes(b"not the weights")
    assert not offline_weights._digest_ok(f, "mobilenet_v2-b0353104.pth")
