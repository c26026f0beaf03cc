"""Settings precedence, auth rules and the public API surface."""

from __future__ import annotations

from pathlib import Path

import pytest

import studioserve
from studioserve.config import ServeConfig, default_store_url, resolve_store_url
from studioserve.errors import ConfigError


def test_store_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.delenv("STUDIO_STORE", raising=False)
    assert default_store_url() == str(home / "experiments")
    home.mkdir()
    (home / "studioserve.toml").write_text('store = "s3://bucket/from-file"\n')
    assert default_store_url() == "s3://bucket/from-file"
    monkeypatch.setenv("STUDIO_STORE", "gs://bucket/from-env")
    assert default_store_url() == "gs://bucket/from-env"
    assert resolve_store_url("/from/option") == "/from/option"


def test_broken_config_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STUDIO_STORE", raising=False)
    cfg = tmp_path / "bad.toml"
    cfg.write_text("store = [unclosed\n")
    monkeypatch.setenv("STUDIO_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match="bad.toml"):
        default_store_url()


@pytest.mark.parametrize(
    ("host", "token", "no_auth", "expected"),
    [
        ("127.0.0.1", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("10.1.2.3", None, False, True),
        ("0.0.0.0", None, True, False),
        ("127.0.0.1", "tok", False, True),
    ],
)
def test_auth_is_on_for_non_loopback_hosts(
    host: str, token: str | None, no_auth: bool, expected: bool
) -> None:
    cfg = ServeConfig(key="k", host=host, token=token, no_auth=no_auth)
    assert cfg.auth_enabled is expected


@pytest.mark.parametrize(
    "changes",
    [{"port": -1}, {"killafter": -1}, {"max_batch_size": 0}, {"max_delay_ms": -1}],
)
def test_invalid_settings_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ServeConfig(key="k", **changes)  # type: ignore[arg-type]


def test_exported_members() -> None:
    assert set(studioserve.__all__) == {
        "Client",
        "ModelPipe",
        "ServeConfig",
        "StudioServeError",
        "__version__",
        "serve",
    }
    for name in studioserve.__all__:
        assert getattr(studioserve, name) is not None
