"""The ``[tokens]`` and ``[registries."URL"]`` tables of config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from npmguard.config import ConfigError, load_settings


def _settings(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_settings(path)


def test_tokens_defaults(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "")

    chosen = settings.for_registry("https://registry.npmjs.org/")

    assert chosen.rotate_days == 0
    assert chosen.mint is True
    assert chosen.remind_days == 90


def test_registry_by_url(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, '[registries."http://127.0.0.1:4873"]\nrotate_days = 7\n'
    )

    assert settings.for_registry("//127.0.0.1:4873/").rotate_days == 7


def test_registry_by_key(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, '[registries."//npm.example.com/team/"]\nprovider = "none"\n'
    )

    assert settings.for_registry("https://npm.example.com/team/x").provider == "none"


def test_registry_inherits_tokens(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        '[tokens]\nremind_days = 30\n[registries."https://r.example/"]\nmint = false\n',
    )

    chosen = settings.for_registry("https://r.example/")

    assert chosen.remind_days == 30
    assert chosen.mint is False


def test_registry_other_gets_tokens(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, '[tokens]\nrotate_days = 14\n[registries."https://r.example/"]\n'
    )

    assert settings.for_registry("https://other.example/").rotate_days == 14


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[tokens]\nrotate_days = -1\n', "tokens.rotate_days"),
        ('[tokens]\nmint = "yes"\n', "tokens.mint"),
        ('[tokens]\nmint_ttl_seconds = 5\n', "mint_ttl_seconds"),
        ('[tokens]\nprovider = "gitlab"\n', "unknown setting tokens.provider"),
        ('[registries."ftp://x/"]\n', "not an http(s) registry URL"),
        ('[registries."https://r.example/"]\nprovider = "svn"\n', "provider must be"),
        ('[registries."https://r.example/"]\napi = "nope"\n', "api must be a URL"),
        ('[registries]\nx = 1\n', "must be a table"),
    ],
)
def test_tokens_invalid(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, text)

    assert words in str(caught.value)
    assert str(tmp_path / "config.toml") in str(caught.value)
