"""Trained artefacts reach users: a LoRA run's adapter and a probe shipped into the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import guard.assets
from guard import adapters, load_model
from guard.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AlignedAlias
from guard.errors import ConfigError
from guard.probe import LinearProbe
from tests.helpers import fitted_probe
from training import ship
from training.cli import app
from training.finetune.align import ADAPTER_DIR, RUN_FILE, AlignConfig

pytest.importorskip("peft")
runner = CliRunner()
ALIAS = "tiny-aligned"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) LoRA alignment run: merged checkpoint + adapter/ + run record."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    args = [
        "align", "--model", str(tiny_model_dir), "--out", str(out), "--n-harmful", "4",
        "--epochs", "1", "--batch-size", "4", "--max-length", "400", "--lr", "5e-2", "--lora",
        "--lora-r", "4", "--positional-every", "0", "--mix", "coconot_pref=2,gsm8k=1",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def slots(monkeypatch, tmp_path, tiny_model_dir) -> Path:
    """An aligned alias over the tiny model, with package asset dirs under ``tmp_path``."""
    assets = tmp_path / "assets"
    monkeypatch.setenv("TRAJGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(guard.assets, "ADAPTERS_DIR", assets / "adapters")
    monkeypatch.setattr(guard.assets, "PROBES_DIR", assets / "probes")
    monkeypatch.setitem(adapters.ALIGNED, ALIAS, AlignedAlias(str(tiny_model_dir), "tiny"))
    monkeypatch.setitem(guard.assets.SHIPPED_PROBES, ALIAS, "tiny-probe")
    return assets


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 3, 99, 7]])).logits


def test_lora_run_keeps_an_adapter_named_after_its_base(lora_run, tiny_model_dir):
    config = json.loads((lora_run / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # as given, not a cache path
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert not (lora_run / ADAPTER_DIR / "README.md").exists()


def test_shipped_adapter_rebuilds_the_trained_model(lora_run, slots):
    target = ship.ship_adapter(lora_run, ALIAS)
    assert target == slots / "adapters" / "tiny"
    assert {p.name for p in target.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, ship.RECORD_FILE}
    record = json.loads((target / ship.RECORD_FILE).read_text())
    trained = json.loads((lora_run / RUN_FILE).read_text())
    assert record["config"] == trained["config"] and record["method"] == "align"
    assert record["wall_time_s"] == trained["wall_time_s"]
    assert "log_history" not in record
    merged = load_model(ALIAS)  # hand merge of the shipped copy, no peft
    config_text = (merged.path / "config.json").read_text()
    assert "quantization_config" not in config_text
    expected = _logits(load_model(str(lora_run)).model)  # peft's own merge at the end of training
    torch.testing.assert_close(_logits(merged.model), expected, atol=1e-4, rtol=1e-4)


def test_ship_adapter_refuses_what_the_package_cannot_hold(lora_run, slots, monkeypatch):
    with pytest.raises(ConfigError, match="not an aligned alias"):
        ship.ship_adapter(lora_run, "no-such-alias")
    with pytest.raises(ConfigError, match="train with --lora"):
        ship.ship_adapter(lora_run.parent, ALIAS)
    monkeypatch.setattr(ship, "MAX_ADAPTER_BYTES", 1024)
    with pytest.raises(ConfigError, match="16 MiB budget"):
        ship.ship_adapter(lora_run, ALIAS)
    assert not (slots / "adapters").exists()  # nothing half-shipped


def _probe_for(model, out: Path) -> Path:
    fitted_probe(model.config.hidden_size, "blocks.0.hook_resid_post").bind(model).save(out)
    return out


def test_ship_probe_requires_the_alias_s_own_weights(lora_run, slots, tiny_model_dir, tmp_path):
    ship.ship_adapter(lora_run, ALIAS)
    base_probe = _probe_for(load_model(str(tiny_model_dir)).model, tmp_path / "base-probe")
    with pytest.raises(ConfigError, match=f"--model {ALIAS}"):
        ship.ship_probe(base_probe, ALIAS)
    own = _probe_for(load_model(ALIAS).model, tmp_path / "own-probe")
    target = ship.ship_probe(own, ALIAS)
    assert target == slots / "probes" / "tiny-probe"
    assert guard.assets.probe_dir_for(ALIAS) == target
    LinearProbe.load(target).check_compatible(load_model(ALIAS).model)


def test_replay_reruns_the_recorded_config(lora_run, monkeypatch, tmp_path):
    seen: list[AlignConfig] = []

    def fake_run(config):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("training.cli.run_align", fake_run)
    runner.invoke(app, ["replay", str(lora_run / RUN_FILE), "--out", str(tmp_path / "again")])
    recorded = json.loads((lora_run / RUN_FILE).read_text())["config"]
    assert len(seen) == 1
    assert seen[0] == AlignConfig(**{**recorded, "out": str(tmp_path / "again")})
