"""Embedded *aligned* models: a shipped LoRA adapter merged by hand into its base.

An aligned alias names a base alias and a LoRA adapter shipped under
``guard/assets/adapters/<name>/`` (``adapter_model.safetensors`` + ``adapter_config.json``,
as written by ``peft``). On first use the adapter is merged, without ``peft`` (not a core
dependency), into a plain safetensors HF directory that later loads fast and that
``vllm serve`` accepts: ``W += transpose(B @ A, fan_in_fan_out) * scaling`` with
``scaling = alpha / r`` (``alpha / sqrt(r)`` under ``use_rslora``), as in ``peft``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from guard.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)


class AlignedAlias(NamedTuple):
    """An aligned alias: the model it adapts (alias, directory or HF id) and its adapter."""

    base: str
    adapter: str  # directory name under guard/assets/adapters/


ALIGNED: dict[str, AlignedAlias] = {
    "smollm2-135m-instruct-aligned": AlignedAlias(
        "smollm2-135m-instruct", "smollm2-135m-instruct-aligned"
    ),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_MARKER = "trajguard_adapter.json"

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# Config fields that must be falsy: each changes what a plain ``W += ΔW`` merge computes.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# Initialisations that leave the base weights untouched (pissa/olora/corda/loftq/lora_ga
# rewrite them, so the adapter would not apply to the shipped base).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # and True / False
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "lora_embedding_": "embedding LoRA",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_tokens": "trainable tokens (trainable_token_indices)",
    ".base_layer.": "a full layer copy (save again with save_embedding_layers=False)",
}


def shipped_adapter(alias: str) -> Path:
    """The shipped adapter directory of aligned ``alias``.

    Raises:
        ModelNotFoundError: ``alias`` is not aligned, or its adapter is not shipped yet.
    """
    from guard.assets import shipped_adapter_dir  # lazy: guard.assets imports guard.models

    if alias not in ALIGNED:
        raise ModelNotFoundError(f"{alias!r} is not an aligned alias ({', '.join(ALIGNED)})")
    adapter = shipped_adapter_dir(ALIGNED[alias].adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file() or not (adapter / ADAPTER_CONFIG).is_file():
        raise ModelNotFoundError(
            f"aligned model {alias!r} is not shipped yet: no LoRA adapter "
            f"({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}) in {adapter}"
        )
    return adapter


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 of an adapter's config and weights (what the merge depends on)."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = adapter_dir / name
        if not path.is_file():
            raise ModelNotFoundError(f"LoRA adapter {adapter_dir}: {name} not found")
        digest.update(name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_adapter_config(adapter_dir: Path, *, base_name: str | None = None) -> dict[str, Any]:
    """``adapter_config.json``, checked to be a plain LoRA that ``merge_lora`` can merge.

    Args:
        adapter_dir: the adapter directory.
        base_name: the expected base (alias or path); the adapter's
            ``base_model_name_or_path``, when set, must name the same model.

    Raises:
        ConfigError: not a LoRA, or a feature the merge does not implement, or another base.
    """
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    where = f"LoRA adapter {adapter_dir}"
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise ConfigError(f"{where}: {feature} cannot be merged by trajguard")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{where}: bias={config['bias']!r} is unsupported (need 'none')")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PLAIN_INITS:
        raise ConfigError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights; save the adapter "
            "with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    trained_on = config.get("base_model_name_or_path")
    if base_name and trained_on and Path(trained_on).name != Path(base_name).name:
        raise ConfigError(f"{where}: trained on {trained_on!r}, not on base {base_name!r}")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """``peft``'s ``get_pattern_key`` lookup: the first pattern matching ``module``'s tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_deltas(adapter_dir: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per target module, ``(B @ A) * scaling`` as fp32 ``(out, in)`` (untransposed)."""
    where = f"LoRA adapter {adapter_dir}"
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    stray = [key for key in tensors if _KEY.match(key) is None]
    for pattern, feature in _UNSUPPORTED_KEYS.items():
        if key := next((k for k in stray if pattern in k), None):
            raise ConfigError(f"{where}: {feature} ({key}) cannot be merged")
    if stray:
        raise ConfigError(f"{where}: unsupported tensor {stray[0]} cannot be merged")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        pairs.setdefault(match["module"], {})[match["part"]] = tensor.to(torch.float32)
    if not pairs:
        raise ConfigError(f"{where}: no lora_A/lora_B weights")
    deltas = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].ndim != 2:
            raise ConfigError(f"{where}: {module} needs one 2-D lora_A and one 2-D lora_B")
        rank = ab["A"].shape[0]
        expected = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
        if ab["B"].shape[1] != rank or rank != expected:
            raise ConfigError(f"{where}: {module} has rank {rank}, its config says {expected}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[module] = (ab["B"] @ ab["A"]) * scaling
    return deltas


def _apply(model: PreTrainedModel, deltas: dict[str, torch.Tensor], fan_in_fan_out: bool) -> None:
    """Add each delta to its module's weight in place; refuse a base the adapter does not fit."""
    shared = _shared_weight_names(model)
    for module_name, delta in deltas.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise ConfigError(f"LoRA target {module_name} is not in the base model") from exc
        if isinstance(module, torch.nn.Embedding):
            raise ConfigError(f"LoRA target {module_name}: embedding LoRA cannot be merged")
        transposed = isinstance(module, Conv1D)  # weight stored (in, out)
        if not transposed and not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"LoRA target {module_name} is a {type(module).__name__}")
        if transposed != bool(fan_in_fan_out):
            raise ConfigError(
                f"LoRA target {module_name}: fan_in_fan_out={fan_in_fan_out} does not fit "
                f"a {type(module).__name__} layer"
            )
        if f"{module_name}.weight" in shared:
            raise ConfigError(f"LoRA target {module_name} has tied weights (would change both)")
        delta = delta.T if transposed else delta
        weight = module.weight
        if tuple(weight.shape) != tuple(delta.shape):
            raise ConfigError(
                f"LoRA target {module_name}: delta {tuple(delta.shape)} does not fit "
                f"weight {tuple(weight.shape)} (adapter trained on another base?)"
            )
        with torch.no_grad():
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))


def _shared_weight_names(model: PreTrainedModel) -> set[str]:
    """Names of parameters tied to another (e.g. ``lm_head.weight`` with tied embeddings)."""
    by_ptr: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(param.data_ptr(), []).append(name)
    return {name for names in by_ptr.values() if len(names) > 1 for name in names}


def _base_stamp(base_dir: Path) -> list[list[Any]]:
    """Names, sizes and mtimes of the base's weight files: changes when it is rebuilt."""
    files = sorted(base_dir.glob("*.safetensors"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def merge_lora(
    base_dir: Path, adapter_dir: Path, out_dir: Path, *, base_name: str | None = None
) -> Path:
    """Merge a ``peft`` LoRA adapter into a base HF directory, writing ``out_dir`` atomically.

    ``out_dir`` gets config (no ``quantization_config``), generation config, tokenizer
    files, ``model.safetensors`` and ``trajguard_adapter.json`` (the adapter's sha256).

    Raises:
        ModelNotFoundError: a file is missing. ConfigError: the adapter cannot be merged.
    """
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    digest = adapter_digest(adapter_dir)
    config = read_adapter_config(adapter_dir, base_name=base_name)
    deltas = lora_deltas(adapter_dir, config)
    if not (base_dir / "config.json").is_file() or not _base_stamp(base_dir):
        raise ModelNotFoundError(f"base model {base_dir} holds no config.json + safetensors")
    logger.info("merging LoRA %s into %s -> %s (one-off)", adapter_dir.name, base_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", local_files_only=True)
    _apply(model, deltas, bool(config.get("fan_in_fan_out")))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    provenance = {
        "base": str(base_dir),
        "base_stamp": _base_stamp(base_dir),
        "adapter": str(adapter_dir),
        "adapter_sha256": digest,
        "modules": len(deltas),
    }
    return save_model_dir(model, tokenizer, out_dir, {MERGED_MARKER: provenance})


def save_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    records: dict[str, dict[str, Any]],
) -> Path:
    """Write model (safetensors), tokenizer and JSON ``records`` to ``out_dir`` atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, record in records.items():
            (tmp / name).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_merged(
    base_dir: Path, adapter_dir: Path, out_dir: Path, *, base_name: str | None = None
) -> Path:
    """``out_dir``, merged anew unless it holds this adapter (sha256) on this base build."""
    marker = out_dir / MERGED_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("adapter_sha256") == adapter_digest(adapter_dir) and recorded.get(
            "base_stamp"
        ) == _base_stamp(base_dir):
            return out_dir
        logger.info("adapter or base of %s changed: re-merging", out_dir)
    return merge_lora(base_dir, adapter_dir, out_dir, base_name=base_name)


__all__ = [
    "ALIGNED",
    "AlignedAlias",
    "adapter_digest",
    "ensure_merged",
    "lora_deltas",
    "merge_lora",
    "read_adapter_config",
    "save_model_dir",
    "shipped_adapter",
]
