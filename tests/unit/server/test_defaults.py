"""The main job's defaults: the aligned embedded model, guarded by the probe shipped for it."""

from __future__ import annotations

import inspect

import pytest

from guard import BASE_MODEL, DEFAULT_MODEL
from guard.adapters import ALIGNED
from guard.assets import default_probe_dir, probe_dir_for
from guard.cli import generate
from guard.errors import ConfigError
from server.cli import serve
from server.config import ServerConfig


def _default(command, name: str):
    return inspect.signature(command).parameters[name].default.default  # typer.Option


def test_serve_and_generate_default_to_the_aligned_alias():
    assert DEFAULT_MODEL in ALIGNED and ALIGNED[DEFAULT_MODEL].base == BASE_MODEL
    assert _default(serve, "model") == DEFAULT_MODEL == ServerConfig().model
    assert _default(generate, "model") == DEFAULT_MODEL


def test_each_embedded_alias_has_its_own_shipped_probe():
    assert default_probe_dir() == probe_dir_for(DEFAULT_MODEL) != probe_dir_for(BASE_MODEL)
    with pytest.raises(ConfigError, match="pass --probe"):
        probe_dir_for("some/other-model")
