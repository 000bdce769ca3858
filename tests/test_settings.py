"""Settings: environment, TOML file, precedence, and safe printing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cardigan.store.index import escape_filter_string
from config.settings import load_settings, redact_url


def test_env_nested_and_toml_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "cardigan.toml"
    toml.write_text('collection = "from_file"\nbroker_url = "amqp://u:p@rabbit//"\n[encoder]\nbackbone = "resnet18"\nbatch_size = 16\n')
    monkeypatch.setenv("CARDIGAN_CONFIG", str(toml))
    monkeypatch.setenv("CARDIGAN_COLLECTION", "from_env")
    monkeypatch.setenv("CARDIGAN_ENCODER__BATCH_SIZE", "128")
    s = load_settings()
    assert s.collection == "from_env"  # the environment beats the file
    assert s.encoder.backbone == "resnet18"  # the file fills what the environment does not say
    assert s.encoder.batch_size == 128
    assert s.broker_url == "amqp://u:p@rabbit//"
    assert load_settings(collection="explicit").collection == "explicit"  # constructor beats both


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDIGAN_CONFIG", "/nonexistent/cardigan.toml")
    with pytest.raises(FileNotFoundError, match="/nonexistent/cardigan.toml"):
        load_settings()


def test_bad_values_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARDIGAN_CONFIG", raising=False)
    monkeypatch.setenv("CARDIGAN_ENCODER__BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="encoder.batch_size"):
        load_settings()
    monkeypatch.delenv("CARDIGAN_ENCODER__BATCH_SIZE")
    with pytest.raises(ValidationError, match="collection"):
        load_settings(collection='x"; drop')


def test_state_url_required_with_rabbitmq() -> None:
    s = load_settings(broker_url="amqp://guest:guest@127.0.0.1//", state_url="")
    with pytest.raises(ValueError, match="CARDIGAN_STATE_URL"):
        _ = s.effective_state_url
    assert load_settings(broker_url="redis://h:1/2", state_url="").effective_state_url == "redis://h:1/2"


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("amqps://user:pw@rabbit:5671/vh") == "amqps://user:***@rabbit:5671/vh"
    assert redact_url("http://127.0.0.1:19530") == "http://127.0.0.1:19530"
    assert "Zq9secret" not in repr(load_settings(milvus_token="Zq9secret"))  # SecretStr never prints


def test_filter_escaping_keeps_values_inside_quotes() -> None:
    assert escape_filter_string('x" or product_id != "') == '"x\\" or product_id != \\""'
    assert escape_filter_string("a\\") == '"a\\\\"'
