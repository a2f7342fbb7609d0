"""guard.adapters: a peft LoRA merged by hand equals peft's merge_and_unload()."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import guard.assets
from guard import adapters, models
from guard.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_MARKER, AlignedAlias
from guard.errors import ConfigError, ModelNotFoundError
from tests.conftest import build_tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "Sure, here is how to do it: step one, step two"


def save_base(directory: Path, model, tokenizer) -> Path:
    """A base HF directory (safetensors + tokenizer) like the converted embedded default."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_adapter(
    base_dir: Path, out: Path, seed: int = 1, save_embedding_layers: bool = False, **lora
) -> torch.Tensor:
    """Train-free peft LoRA with nonzero B saved to ``out``; returns merge_and_unload logits."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **({"target_modules": TARGETS} | lora))
    wrapped = peft.get_peft_model(base, config).eval()
    wrapped.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return logits(wrapped.merge_and_unload(), len(base.get_input_embeddings().weight))


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.arange(vocab)[torch.tensor([5, 17, 42, 3, 99, 250, 7, 11]) % vocab]
    with torch.no_grad():
        return model(ids[None]).logits


@pytest.fixture
def base_dir(tmp_path, tiny_tokenizer) -> Path:
    model = build_tiny_model("llama", len(tiny_tokenizer))
    return save_base(tmp_path / "base", model, tiny_tokenizer)


@pytest.fixture
def adapter_dir(tmp_path, base_dir) -> Path:
    make_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8)
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 8, "lora_alpha": 3, "use_rslora": True},
        {"r": 2, "lora_alpha": 16, "lora_dropout": 0.1},
        {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 5},
            "target_modules": [*TARGETS, "lm_head"],
        },
    ],
    ids=["plain", "rslora", "r2-dropout", "patterns-lm_head"],
)
def test_hand_merge_equals_peft_merge_and_unload(tmp_path, base_dir, tiny_tokenizer, lora):
    expected = make_adapter(base_dir, tmp_path / "adapter", **lora)
    out = adapters.merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    got = logits(merged, len(tiny_tokenizer))
    assert not torch.allclose(got, logits(base, len(tiny_tokenizer)), atol=1e-3)  # B != 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fan_in_fan_out_conv1d_gpt2(tmp_path, tiny_tokenizer):
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base_dir = save_base(tmp_path / "base", model, tiny_tokenizer)
    targets = ["c_attn", "c_proj", "c_fc"]
    expected = make_adapter(
        base_dir,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        target_modules=targets,
    )
    out = adapters.merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, len(tiny_tokenizer)), expected, atol=1e-5, rtol=0)


def test_merged_dir_is_plain_and_reloads(tmp_path, base_dir, adapter_dir):
    out = adapters.merge_lora(base_dir, adapter_dir, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", MERGED_MARKER} <= names
    assert "tokenizer.json" in names and not any(n.endswith((".bin", ".pt")) for n in names)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    provenance = json.loads((out / MERGED_MARKER).read_text())
    assert provenance["adapter_sha256"] == adapters.adapter_digest(adapter_dir)
    assert provenance["modules"] == 3 * len(TARGETS)
    assert not list(tmp_path.glob("merged.*"))  # no temporary directory left behind
    AutoModelForCausalLM.from_pretrained(out)


@pytest.fixture
def aligned(monkeypatch, tmp_path, base_dir, adapter_dir) -> Path:
    """An aligned alias ``tiny-aligned`` over ``base_dir`` with a shipped adapter copy."""
    home, shipped = tmp_path / "home", tmp_path / "assets" / "adapters"
    monkeypatch.setenv("TRAJGUARD_HOME", str(home))
    monkeypatch.setattr(guard.assets, "ADAPTERS_DIR", shipped)
    monkeypatch.setitem(adapters.ALIGNED, "tiny-aligned", AlignedAlias(str(base_dir), "tiny"))
    shutil.copytree(adapter_dir, shipped / "tiny")
    return shipped / "tiny"


def test_resolve_merges_once_then_reuses(monkeypatch, tmp_path, aligned):
    target = models.resolve_model_path("tiny-aligned")
    assert target == tmp_path / "home" / "models" / "tiny-aligned"
    assert (target / MERGED_MARKER).is_file()

    def no_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr(adapters, "merge_lora", no_merge)
    start = time.perf_counter()
    loaded = models.load_model("tiny-aligned")
    assert time.perf_counter() - start < 3
    assert loaded.path == target and loaded.model_id == "tiny-aligned"


def test_changed_adapter_triggers_rebuild(tmp_path, aligned):
    target = models.resolve_model_path("tiny-aligned")
    before = load_file(target / "model.safetensors")
    weights = load_file(aligned / ADAPTER_WEIGHTS)
    save_file(
        {k: v * 2 if ".lora_B." in k else v for k, v in weights.items()}, aligned / ADAPTER_WEIGHTS
    )
    assert models.resolve_model_path("tiny-aligned") == target
    after = load_file(target / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    recorded = json.loads((target / MERGED_MARKER).read_text())["adapter_sha256"]
    assert recorded == adapters.adapter_digest(aligned)


def test_unshipped_adapter_raises_before_converting_the_base(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAJGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(guard.assets, "ADAPTERS_DIR", tmp_path / "none")
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("base converted"))
    for alias in adapters.ALIGNED:  # the real table, with its adapters missing
        with pytest.raises(ModelNotFoundError, match="not shipped yet"):
            models.load_model(alias)
    assert not (tmp_path / "home").exists()


def test_the_default_is_the_aligned_alias_of_the_embedded_base():
    assert models.DEFAULT_MODEL in adapters.ALIGNED and models.BASE_MODEL not in adapters.ALIGNED
    assert all(v.base == models.BASE_MODEL for v in adapters.ALIGNED.values())


def edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / ADAPTER_CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"init_lora_weights": "loftq"}, "rewrites the base weights"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M"}, "trained on"),
        ({"r": 16}, "rank 4, its config says 16"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True does not fit a Linear"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, base_dir, adapter_dir, changes, message):
    edit_config(adapter_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        adapters.merge_lora(base_dir, adapter_dir, tmp_path / "merged", base_name=str(base_dir))
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["embed_tokens"]}, "embedding LoRA"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["lm_head"], "save_embedding_layers": True}, "full layer copy"),
    ],
)
def test_real_peft_features_are_refused(tmp_path, base_dir, lora, message):
    make_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8, **lora)
    with pytest.raises(ConfigError, match=message):
        adapters.merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged")


def test_stray_tensors_are_refused(tmp_path, base_dir, adapter_dir):
    weights = load_file(adapter_dir / ADAPTER_WEIGHTS)
    key = "base_model.model.model.embed_tokens.lora_embedding_A"
    save_file(weights | {key: torch.zeros(4, 8)}, adapter_dir / ADAPTER_WEIGHTS)
    with pytest.raises(ConfigError, match="embedding LoRA"):
        adapters.merge_lora(base_dir, adapter_dir, tmp_path / "merged")


def test_base_mismatch_is_refused(tmp_path, tiny_tokenizer, adapter_dir):
    wider = build_tiny_model("llama", len(tiny_tokenizer), intermediate_size=48)
    other = save_base(tmp_path / "other", wider, tiny_tokenizer)
    with pytest.raises(ConfigError, match="does not fit weight"):
        adapters.merge_lora(other, adapter_dir, tmp_path / "merged")
    shallow = save_base(
        tmp_path / "shallow",
        build_tiny_model("llama", len(tiny_tokenizer), n_layers=2),
        tiny_tokenizer,
    )
    with pytest.raises(ConfigError, match="not in the base model"):
        adapters.merge_lora(shallow, adapter_dir, tmp_path / "merged")


def test_tied_lm_head_is_refused(tmp_path, tiny_tokenizer):
    tied = build_tiny_model("llama", len(tiny_tokenizer), tie_word_embeddings=True)
    base_dir = save_base(tmp_path / "base", tied, tiny_tokenizer)
    weights = {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 32),
        "base_model.model.lm_head.lora_B.weight": torch.randn(len(tiny_tokenizer), 4),
    }
    (tmp_path / "adapter").mkdir()
    save_file(weights, tmp_path / "adapter" / ADAPTER_WEIGHTS)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]}
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="tied weights"):
        adapters.merge_lora(base_dir, tmp_path / "adapter", tmp_path / "merged")


def test_missing_adapter_files(tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=ADAPTER_CONFIG):
        adapters.merge_lora(base_dir, tmp_path / "empty", tmp_path / "merged")
