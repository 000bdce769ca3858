"""``cardigan stack up|down|status``: the embedded servers of one machine, from the shell.

``up`` prints ``export CARDIGAN_…=…`` lines, so ``eval "$(cardigan stack up)"`` points every
later ``cardigan`` command (and ``cardigan worker``) at the stack. The choices made at ``up``
(S3 mode, Flower) are remembered in the data directory, so ``status`` and a second ``up``
describe the same stack without repeating the flags.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from cardigan.cli._devkit import require_devkit

if TYPE_CHECKING:  # devkit is imported when a command runs, never by `import cardigan.cli`
    from devkit.stack import Stack

DEFAULT_DIR = Path(".cardigan") / "stack"
_CHOICES_FILE = "cardigan-stack.json"  # the flags of the last `up`, for later commands

console = Console()
err_console = Console(stderr=True)

stack_app = typer.Typer(
    help="The embedded stack for one machine: Valkey, Milvus Lite server, S3 (moto or rclone), Flower.", no_args_is_help=True
)

_DATA_DIR_HELP = "where the servers keep their data, pids and logs (default: $CARDIGAN_STACK_DIR or ./.cardigan/stack)"


def default_data_dir() -> Path:
    """``$CARDIGAN_STACK_DIR``, else ``.cardigan/stack`` under the current directory."""
    env = os.environ.get("CARDIGAN_STACK_DIR")
    return Path(env) if env else DEFAULT_DIR


def _choices(data_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((data_dir / _CHOICES_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def make_stack(data_dir: Path | None, *, s3: str | None = None, flower: bool | None = None, milvus: str | None = None) -> Stack:
    """A Stack for ``data_dir`` with the given flags, else the ones remembered from ``up``."""
    sk = require_devkit("devkit.stack", "stack")
    d = (data_dir or default_data_dir()).absolute()
    remembered = _choices(d)
    mode = s3 or remembered.get("s3") or "moto"
    if mode not in sk.S3_MODES:
        err_console.print(f"[red]error:[/] --s3 must be one of {', '.join(sk.S3_MODES)}, not {mode!r}")
        raise typer.Exit(2)
    use_flower = flower if flower is not None else bool(remembered.get("flower", False))
    kind = milvus or remembered.get("milvus") or "lite"
    if kind not in sk.MILVUS_MODES:
        err_console.print(f"[red]error:[/] --milvus must be one of {', '.join(sk.MILVUS_MODES)}, not {kind!r}")
        raise typer.Exit(2)
    return sk.Stack(d, s3=mode, flower=use_flower, milvus=kind)  # type: ignore[arg-type]


def export_lines(env: dict[str, str]) -> str:
    """``export K=V`` lines, shell-quoted, for ``eval``."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


@stack_app.command("up")
def up(
    data_dir: Path | None = typer.Option(None, "--data-dir", "-d", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of export lines"),
    flower: bool | None = typer.Option(None, "--flower/--no-flower", help="also run Flower (loopback, basic auth)"),
    s3: str | None = typer.Option(
        None, "--s3", help="moto (S3 server, Python), rclone (S3 server, Go: faster, objects kept as files) or folder (file:// images)"
    ),
    milvus: str | None = typer.Option(
        None,
        "--milvus",
        help="lite (Milvus Lite: Python, the default) or server (the real standalone Milvus 2.3.5 from the milvus wheel, "
        "auth on; it listens on every interface, so use it behind a firewall)",
    ),
    timeout: float = typer.Option(90, "--timeout", min=1, help="seconds to wait for every server to answer"),
) -> None:
    """Start (or reuse) the servers and print how to reach them."""
    st = make_stack(data_dir, s3=s3, flower=flower, milvus=milvus)
    from devkit.stack import StackError

    before = {name for name, s in st.status().items() if s["running"]}
    try:
        info = st.up(timeout)
    except StackError as e:
        err_console.print(f"[red]error:[/] {e.reason}")
        err_console.print(f"logs: {st.log_dir}; `cardigan stack down --data-dir {st.data_dir}` stops what did start")
        raise typer.Exit(1) from None
    (st.data_dir / _CHOICES_FILE).write_text(json.dumps({"s3": st.s3, "flower": st.flower, "milvus": st.milvus}) + "\n")
    reused = sorted(before & set(st.services))
    # CARDIGAN_STACK_DIR too: later `cardigan stack status|down` in that shell find these servers
    env = {**info.env(), "CARDIGAN_STACK_DIR": str(st.data_dir)}
    if as_json:
        print(json.dumps({**info.to_json(), "reused": reused, "env": _public_env(env)}))
        return
    print(export_lines(env))
    started = [s for s in st.services if s not in before]
    # plain stderr, not rich: one unwrapped line per fact, and stdout stays eval-able
    again = "cardigan stack up" + (f" --data-dir {shlex.quote(str(data_dir))}" if data_dir else "")
    msg = f"# stack in {st.data_dir}: started {', '.join(started) or 'nothing'}"
    msg += f", reused {', '.join(reused)}" if reused else ""
    typer.echo(msg + f'; use it with: eval "$({again})"', err=True)
    if info.flower_url:
        typer.echo(f"# flower: {info.flower_url} (user {info.flower_user}, password in CARDIGAN_FLOWER_PASSWORD)", err=True)


def _public_env(env: dict[str, str]) -> dict[str, str]:
    """The env without secrets (JSON output may end up in logs); the export lines have them."""
    return {k: v for k, v in env.items() if "PASSWORD" not in k and "SECRET" not in k and "TOKEN" not in k}


@stack_app.command("down")
def down(
    data_dir: Path | None = typer.Option(None, "--data-dir", "-d", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Stop exactly the servers this data directory's pid files name; data stays."""
    st = make_stack(data_dir)
    from devkit.stack import StackError

    try:
        stopped = st.down()
    except StackError as e:
        err_console.print(f"[red]error:[/] {e.reason}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"data_dir": str(st.data_dir), "stopped": stopped}))
    else:
        console.print(f"stopped {', '.join(stopped) or 'nothing (no server was running)'} ({st.data_dir})")


@stack_app.command("status")
def status(
    data_dir: Path | None = typer.Option(None, "--data-dir", "-d", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What runs: pid, port and health of each server. Starts nothing. Exit 1 if one is down."""
    st = make_stack(data_dir)
    services = st.status()
    all_up = bool(services) and all(s["running"] and s["healthy"] for s in services.values())
    if as_json:
        print(json.dumps({"data_dir": str(st.data_dir), "up": all_up, "services": services}))
    else:
        t = Table(title=f"stack {st.data_dir}")
        for col in ("service", "state", "pid", "port", "log"):
            t.add_column(col)
        for name, s in services.items():
            state = "[green]healthy[/]" if s["healthy"] else ("[yellow]running, not answering[/]" if s["running"] else "[red]stopped[/]")
            t.add_row(name, state, str(s["pid"] or "-"), str(s["port"] or "-"), s["log"])
        console.print(t)
    raise typer.Exit(0 if all_up else 1)


def register(app: typer.Typer) -> None:
    """``cardigan stack up|down|status``: the one ``stack`` group."""
    app.add_typer(stack_app, name="stack")
