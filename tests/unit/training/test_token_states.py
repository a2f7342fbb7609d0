"""Teacher-forced response states: batching, ordering and the early stop change nothing."""

from __future__ import annotations

import numpy as np
import torch

from guard.arch import decoder_blocks
from training.probes.states import token_states


def _reference(model, prompt: list[int], response: list[int], layer: int) -> np.ndarray:
    """One sequence alone, full forward, HF hidden states after block ``layer``."""
    with torch.no_grad():
        out = model(torch.tensor([prompt + response]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, len(prompt) :].float().numpy()


def test_states_match_a_lone_full_forward_in_the_callers_order(tiny_llama):
    rng = np.random.default_rng(0)
    sequences = [
        (rng.integers(5, 300, size=n_p).tolist(), rng.integers(5, 300, size=n_r).tolist())
        for n_p, n_r in [(9, 3), (4, 20), (15, 1), (6, 7), (3, 30), (12, 12), (5, 2)]
    ]
    got = token_states(
        tiny_llama,
        sequences,
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        batch_size=3,
        pad_id=4,
        progress=False,
    )
    for layer in (0, 1):
        states = got[f"blocks.{layer}.hook_resid_post"]
        assert len(states) == len(sequences)
        for (prompt, response), s in zip(sequences, states):
            assert s.shape == (len(response), tiny_llama.config.hidden_size)
            np.testing.assert_allclose(
                s, _reference(tiny_llama, prompt, response, layer), atol=1e-5
            )


def test_blocks_after_the_deepest_hook_do_not_run(tiny_llama):
    calls = []
    last = decoder_blocks(tiny_llama)[-1]
    handle = last.register_forward_hook(lambda *_: calls.append(1))
    try:
        token_states(
            tiny_llama, [([5, 6, 7], [8, 9])], ["blocks.1.hook_resid_post"], progress=False
        )
        assert calls == []
        token_states(
            tiny_llama, [([5, 6, 7], [8, 9])], ["blocks.-1.hook_resid_post"], progress=False
        )
        assert calls == [1]
    finally:
        handle.remove()
    # The stop hook is gone: a plain forward runs every block again.
    with torch.no_grad():
        tiny_llama(torch.tensor([[5, 6, 7]]))
