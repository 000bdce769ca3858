"""Checkpoints of the whole embedding net: a plain ``state_dict`` written with ``torch.save``.

Loaded with ``weights_only=True``: a checkpoint is data, and unpickling arbitrary objects from
a file someone handed us would be code execution. The file's sha256 names the model version.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(net: nn.Module, path: str | os.PathLike[str]) -> str:
    """Write ``net``'s state_dict (as CPU tensors) to ``path``; return the file's sha256.

    Written to a temporary file and renamed, so a worker never hashes or loads half a file.
    """
    path = Path(path)
    # Contiguous CPU tensors: the same weights give the same bytes (and version) from any device.
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; workers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Mapping[str, torch.Tensor], str]:
    """The state_dict in ``path`` (CPU tensors only) and the sha256 of the bytes it came from.

    One read serves both, so the model version always names the weights actually loaded,
    even if the file is replaced while a worker starts.
    """
    data = Path(path).read_bytes()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"encoder.weights: {os.fspath(path)} is not a state_dict of the embedding net "
            "(expected a mapping of names to tensors, as save_checkpoint writes)"
        )
    return state, hashlib.sha256(data).hexdigest()
