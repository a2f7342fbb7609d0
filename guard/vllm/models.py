"""vLLM model classes that also score every token with the probe (imports vLLM).

The wrapper runs the decoder unchanged and reads the probed residual stream through the
decoder's own auxiliary-hidden-state output (the EAGLE-3 mechanism of vLLM's Llama and
Qwen2 models): with ``aux_hidden_state_layers = (L + 1,)`` the model also returns
``hidden + residual`` after decoder layer ``L``. vLLM's layers fuse the residual add into
the next layer's RMSNorm, so that sum *is* trajguard's ``blocks.L.hook_resid_post``.
No forward hooks are involved, so torch.compile and CUDA graphs see plain tensor ops.

``P(unsafe) = sigmoid(w . h + b)`` is computed in float32 for every token of the batch.
The scores ride along to the sampler inside the hidden states: ``forward`` appends the
raw bits of each token's float32 score as extra columns (2 for bf16/fp16, 1 for fp32),
vLLM's runner gathers the last token of each request (``hidden_states[logits_indices]``)
exactly as for the logits, and :meth:`compute_logits` strips the columns again and hands
the ``[num_rows]`` scores to the logits processor (:mod:`guard.vllm.actuator`). The
columns are bit copies, never arithmetic, so the scores arrive exactly.
"""

from __future__ import annotations

import logging

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from guard.errors import ConfigError, ProbeMismatchError
from guard.hooks import parse_hook_name
from guard.probe import LinearProbe
from guard.vllm._step import STEP_SCORES
from guard.vllm.settings import PluginSettings, check_engine

logger = logging.getLogger(__name__)


def aux_layer_index(hook_name: str, n_layers: int) -> int:
    """Index in vLLM's aux-hidden-state numbering of the probe's activation.

    vLLM records ``hidden + residual`` *before* layer ``i`` as aux index ``i``, so
    ``resid_post`` of layer ``L`` is index ``L + 1`` and ``resid_pre`` of ``L`` is ``L``.
    """
    point = parse_hook_name(hook_name).resolve(n_layers)
    return point.layer + 1 if point.kind == "resid_post" else point.layer


class _ProbedCausalLM:
    """Mixin over a vLLM ``*ForCausalLM`` whose inner model is an ``EagleModelMixin``."""

    def _init_probe(self, vllm_config: VllmConfig) -> None:
        settings = PluginSettings.from_env()
        if settings.probe is None:
            raise ConfigError("TRAJGUARD_PROBE is not set in the vLLM worker")
        check_engine(
            use_v2_model_runner=vllm_config.use_v2_model_runner,
            logits_processors=vllm_config.model_config.logits_processors,
        )
        if get_pp_group().world_size > 1:
            raise ConfigError("the trajguard plugin does not support pipeline parallelism")
        probe = LinearProbe.load(settings.probe)
        config = vllm_config.model_config.hf_config.get_text_config()
        if probe.n_features_in_ != config.hidden_size:
            raise ProbeMismatchError(
                f"probe expects d_model={probe.n_features_in_}, the model has {config.hidden_size}"
            )
        aux = aux_layer_index(probe.hook_name, config.num_hidden_layers)
        self.model._set_aux_hidden_state_layers((aux,))
        weight = torch.tensor(probe.coef_, dtype=torch.float32)
        self.register_buffer("trajguard_weight", weight, persistent=False)
        bias = torch.tensor(probe.intercept_, dtype=torch.float32)
        self.register_buffer("trajguard_bias", bias, persistent=False)
        itemsize = vllm_config.model_config.dtype.itemsize
        self._trajguard_d = config.hidden_size
        self._trajguard_cols = 4 // itemsize  # columns holding one float32 score
        logger.info(
            "trajguard: scoring %s (aux layer %d) with probe %s",
            probe.hook_name,
            aux,
            settings.probe,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, (resid,) = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        # resid: [num_tokens, d_model], hidden + residual after the probed layer.
        logit = resid.float() @ self.trajguard_weight + self.trajguard_bias  # [num_tokens]
        scores = torch.sigmoid(logit)
        packed = scores.view(hidden.dtype).view(scores.shape[0], self._trajguard_cols)
        return torch.cat([hidden, packed], dim=-1)  # [num_tokens, d_model + cols]

    def _split(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Strip the score columns, hand the scores to the logits processor."""
        d = self._trajguard_d
        if hidden_states.shape[-1] != d + self._trajguard_cols:
            return hidden_states  # not from our forward (cannot happen in vLLM 0.32)
        scores = hidden_states[:, d:].contiguous().view(torch.float32).view(-1)  # [rows]
        STEP_SCORES.put(scores)
        return hidden_states[:, :d]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return super().compute_logits(self._split(hidden_states))


class _LocalArgmax:
    """For families with ``LocalArgmaxMixin`` (used by vLLM's V2 model runner)."""

    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().compute_logits_local(self._split(hidden_states))


class TrajguardLlamaForCausalLM(_LocalArgmax, _ProbedCausalLM, LlamaForCausalLM):
    """``LlamaForCausalLM`` (Llama, SmolLM2) plus per-token probe scores."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_probe(vllm_config)


class TrajguardQwen2ForCausalLM(_ProbedCausalLM, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` plus per-token probe scores."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_probe(vllm_config)


class TrajguardQwen3ForCausalLM(_LocalArgmax, _ProbedCausalLM, Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` plus per-token probe scores."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_probe(vllm_config)
