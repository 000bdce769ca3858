"""docker-compose.yml without a Docker engine: valid Compose, and every command and setting wired.

The file is checked against the Compose Specification's JSON schema (vendored in tests/data),
then each service as the container would run it: its command must parse with our CLI (or
Celery's), its CARDIGAN_* variables must be real settings that load, and the URLs, queues and
models they name must agree with the rest of the file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from cardigan.cli import app as cli_app
from config.settings import Settings
from encoder import model_version_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
EMBEDDERS = ("worker-cpu", "worker-gpu", "reindex", "search")  # services whose vectors must share a model
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<: *anchor) resolved here


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` escapes."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or not op or not op.startswith(":")):
            return env[name]
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def service_env(svc: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v), dotenv) for k, v in env.items()}


def example_env() -> dict[str, str]:
    """docker/env.example with the required secrets filled in, as an operator would."""
    out = {}
    for line in (ROOT / "docker" / "env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip() or f"secret-{k.strip().lower()}"
    return out


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = "CARDIGAN_") -> Iterator[str]:
    """Every environment variable the settings read: CARDIGAN_<FIELD>, CARDIGAN_<GROUP>__<FIELD>."""
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from settings_env_names(ann, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def load_settings_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for k in list(os.environ):
        if k.startswith("CARDIGAN_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


def parse_cli(group: Any, prog: str, argv: list[str]) -> Any:
    """Parse ``argv`` down to the leaf command without running it (a UsageError if it is wrong).

    Duck-typed: Celery's commands are click's, typer's are its vendored copy of click.
    """
    ctx = group.make_context(prog, list(argv))
    # the subcommand's name sits in _protected_args (click 8.2+ and typer's vendored copy)
    args = [*getattr(ctx, "_protected_args", []), *ctx.args]
    name, cmd, rest = group.resolve_command(ctx, args)
    assert cmd is not None, f"{prog}: no command {args[:1]}"
    if hasattr(cmd, "resolve_command"):
        return parse_cli(cmd, f"{prog} {name}", rest)
    return cmd.make_context(f"{prog} {name}", rest, parent=ctx)


# -- the file itself ---------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # and the validator does catch a broken file
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["healthcheck"]["retries"] = [5]
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")
    assert len(list(validator.iter_errors(broken))) == 2


def test_vendored_schema_note_names_source_and_license() -> None:
    note = (SCHEMA.parent / "compose-spec.NOTICE").read_text()
    assert "compose-spec/compose-spec" in note and "Apache License" in note


# -- commands ----------------------------------------------------------------------------------


def test_every_command_parses_with_the_cli_it_names(compose: dict[str, Any]) -> None:
    from celery.bin.celery import celery as celery_cli

    cardigan_cli = typer.main.get_command(cli_app)
    runner = CliRunner()
    ours = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or not svc.get("build") and "cardigan" not in str(svc.get("image")):
            continue  # third-party images: their own commands
        assert isinstance(cmd, list), f"{name}: use an exec-form command list"
        if cmd[0] == "cardigan":
            ctx = parse_cli(cardigan_cli, "cardigan", cmd[1:])
            assert runner.invoke(cli_app, [cmd[1], "--help"]).exit_code == 0
            ours += 1
            if cmd[1] == "worker":
                queues = ctx.params["queues"].split(",")
                s = Settings.model_validate({})  # defaults; the env check below ties them to the service
                assert set(queues) <= {s.queue, s.bulk_queue, "cardigan.events", "cardigan.bulk"}, (name, queues)
        elif cmd[0] == "celery":
            parse_cli(celery_cli, "celery", cmd[1:])
            ours += 1
        else:
            pytest.fail(f"{name}: {cmd[0]!r} is neither cardigan nor celery")
    assert ours >= 5  # two workers, flower, publish, reindex


def test_worker_healthcheck_command_parses(compose: dict[str, Any]) -> None:
    from celery.bin.celery import celery as celery_cli

    for name in ("worker-cpu", "worker-gpu"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        argv = interpolate(test[1], {}).split()
        assert argv[0] == "celery"
        ctx = parse_cli(celery_cli, "celery", argv[1:])
        assert ctx.params["destination"] == ["cardigan0@$HOSTNAME"]  # `cardigan worker` names process 0 so


def test_flower_starts_under_celery() -> None:
    """Flower is a Celery plugin command: its --help runs only when the plugin loads."""
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config.celery_app", "flower", "--help"], cwd=ROOT, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]


# -- environment -------------------------------------------------------------------------------


def test_every_cardigan_variable_is_a_setting_and_loads(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    known = set(settings_env_names()) | {"CARDIGAN_CONFIG"}
    dotenv = example_env()
    services = compose["services"]
    hosts = set(services)
    models = {}
    for name, svc in services.items():
        env = service_env(svc, dotenv)
        ours = {k: v for k, v in env.items() if k.startswith("CARDIGAN_")}
        unknown = sorted(set(ours) - known)
        assert not unknown, f"{name}: not settings (typo? Settings ignores unknown names): {unknown}"
        if not ours:
            continue
        s = load_settings_with(ours, monkeypatch)
        # every URL points at a service of this file
        for url in (s.broker_url, s.milvus_uri, s.s3_endpoint_url or "", s.effective_state_url):
            host = urlparse(url).hostname
            assert host in hosts, f"{name}: {url} names no service"
        assert urlparse(s.milvus_uri).port == 19530 and urlparse(s.broker_url).port == 6379
        cmd = svc.get("command") or []
        if cmd[:2] == ["cardigan", "worker"]:
            queues = cmd[cmd.index("--queues") + 1].split(",")
            assert set(queues) <= {s.queue, s.bulk_queue}, f"{name} consumes {queues}, its settings publish to {s.queue}, {s.bulk_queue}"
        if name in EMBEDDERS:
            models[name] = model_version_for(s.encoder)
    assert set(models) == set(EMBEDDERS)
    assert len(set(models.values())) == 1, f"the workers and reindex must embed with one model: {models}"


def test_required_variables_are_documented_and_enforced(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    assert {"IMAGES_SECRET_KEY", "FLOWER_PASSWORD", "REDIS_PASSWORD"} <= required
    assert required <= set(example_env()), "document every required variable in docker/env.example"
    with pytest.raises(KeyError, match="FLOWER_PASSWORD"):
        service_env(compose["services"]["flower"], {"IMAGES_SECRET_KEY": "x", "REDIS_PASSWORD": "x"})
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        service_env(compose["services"]["worker-cpu"], {"IMAGES_SECRET_KEY": "x"})


def test_secure_by_default(compose: dict[str, Any]) -> None:
    """Nothing listens beyond loopback without auth: Redis has a password that every client
    uses, published ports are bound to 127.0.0.1, Flower asks for basic auth, metrics are on
    loopback unless the operator says otherwise."""
    services = compose["services"]
    dotenv = example_env()
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    redis_cmd = [interpolate(str(a), dotenv) for a in services["redis"]["command"]]
    password = redis_cmd[redis_cmd.index("--requirepass") + 1]
    assert password == dotenv["REDIS_PASSWORD"] and password
    assert service_env(services["redis"], dotenv)["REDISCLI_AUTH"] == password  # the healthcheck authenticates
    for name, svc in services.items():
        env = service_env(svc, dotenv)
        if "CARDIGAN_BROKER_URL" in env:
            url = urlparse(env["CARDIGAN_BROKER_URL"])
            assert url.password == password, f"{name} reaches Redis without its password"
            s = Settings(broker_url=env["CARDIGAN_BROKER_URL"], metrics_host=env["CARDIGAN_METRICS_HOST"])
            assert s.metrics_host == "127.0.0.1", f"{name}: metrics beyond loopback by default"
            assert urlparse(s.effective_state_url).password == password
    flower = service_env(services["flower"], dotenv)
    user, _, pw = flower["FLOWER_BASIC_AUTH"].partition(":")
    assert user and pw == dotenv["FLOWER_PASSWORD"]
    assert Settings().metrics_host == "127.0.0.1"  # outside compose too


# -- topology ----------------------------------------------------------------------------------


def test_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert set(deps) <= set(services), f"{name} depends on unknown services"
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image!r})"
        one_shot = svc.get("restart") == "no"
        if one_shot and name != "images-init":
            assert svc.get("profiles") == ["tools"], f"{name}: a one-shot tool belongs to the tools profile"
        if not one_shot:
            assert "healthcheck" in svc, f"{name}: a long-running service needs a healthcheck"
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = {n: service_env(services[n], example_env()) for n in ("worker-cpu", "worker-gpu")}
    assert env["worker-cpu"]["CARDIGAN_ENCODER__DEVICE"] == "cpu" and env["worker-gpu"]["CARDIGAN_ENCODER__DEVICE"] == "cuda"
    cpu_q = services["worker-cpu"]["command"][-1].split(",")
    gpu_q = services["worker-gpu"]["command"][-1].split(",")
    assert cpu_q == ["cardigan.events"] and "cardigan.bulk" in gpu_q  # live on CPU, bulk embedding on GPU
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    mc = " ".join(services["images-init"]["command"])
    assert "mc mb --ignore-existing" in mc and services["images-init"]["depends_on"]["images"]["condition"] == "service_healthy"
    for name in ("worker-cpu", "worker-gpu"):
        assert services[name]["depends_on"]["images-init"]["condition"] == "service_completed_successfully"


def test_dockerfile_installs_what_the_package_needs() -> None:
    docker = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", docker, re.M)
    assert re.search(r"pip install torch==\S+ torchvision==\S+", docker)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert "cardigan" in packages and "workers" in packages
    for pkg in packages:
        assert re.search(rf"^COPY {pkg} \./{pkg}$", docker, re.M), f"the image misses the {pkg} package"
    assert re.search(r"^USER \w+", docker, re.M), "workers parse untrusted images: not as root"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignore and ".git/" in ignore
