"""Run by check-core-install.sh in a venv holding only ``pip install trajguard`` (no extras).

The drop-in library must work end to end (tiny random Llama, in-process tokenizer with a
chat template, fitted probe, guarded generation, the ``trajguard`` CLI), and none of the
extras-only packages may have been installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import guard
from guard import GuardConfig, GuardedEngine, LinearProbe, SamplingParams, encode_chat

EXTRAS_ONLY = ("fastapi", "uvicorn", "trl", "peft", "datasets", "matplotlib")
SPECIAL = ["<|end|>", "<|user|>", "<|assistant|>", "<pad>"]


def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=alphabet)
    bpe.train_from_iterator(["Hello there, how are you today? Fine, thanks."] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>")
    tok.chat_template = (  # rendered by jinja2, a core dependency
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "<|assistant|>"
    )
    return tok


def main() -> None:
    site = Path(guard.__file__).resolve()
    assert Path(sys.prefix).resolve() in site.parents, f"guard imported from {site}, not the venv"
    present = [name for name in EXTRAS_ONLY if importlib.util.find_spec(name) is not None]
    assert not present, f"the core install pulled extras-only packages: {present}"

    tok = tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 32)) + np.repeat([[-1.0], [1.0]], 32, axis=0)
    probe = LinearProbe("blocks.1.hook_resid_post").fit(X, np.repeat([0, 1], 32))
    probe.bind(model, model_id="tiny-random-llama")

    engine = GuardedEngine(model, tok, probe, GuardConfig(holdback=2))
    prompt = encode_chat(tok, [{"role": "user", "content": "Hello, how are you?"}])
    [result] = engine.generate(
        [prompt.prompt_ids], SamplingParams(max_tokens=6), prefills=[prompt.prefill_ids]
    )
    assert result.token_ids and result.summary is not None, result
    assert len(result.scores) == len(result.token_ids), result

    cli = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "trajguard"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "pip install 'trajguard[server]'" in cli.stderr, cli.stderr
    print(
        f"core install OK: guard {guard.__version__}, {len(result.token_ids)} guarded tokens "
        f"({result.finish_reason}), none of {', '.join(EXTRAS_ONLY)} installed"
    )


if __name__ == "__main__":
    main()
