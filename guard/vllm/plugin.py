"""vLLM general plugin (entry point ``vllm.general_plugins``: ``trajguard``).

vLLM calls :func:`register` in every process it starts. With ``TRAJGUARD_PROBE`` set it
replaces the supported architectures by their probed wrappers (:mod:`guard.vllm.models`,
registered lazily so this process imports no model code); otherwise it does nothing.
"""

from __future__ import annotations

import logging

from guard.vllm.settings import PluginSettings

logger = logging.getLogger(__name__)

_MODELS = "guard.vllm.models"

#: vLLM architecture -> ``module:class`` of its wrapper.
WRAPPED_ARCHITECTURES = {
    "LlamaForCausalLM": f"{_MODELS}:TrajguardLlamaForCausalLM",
    "Qwen2ForCausalLM": f"{_MODELS}:TrajguardQwen2ForCausalLM",
    "Qwen3ForCausalLM": f"{_MODELS}:TrajguardQwen3ForCausalLM",
}


def register() -> None:
    """Register the wrappers when the plugin is configured (idempotent)."""
    settings = PluginSettings.from_env()
    if settings.probe is None:
        logger.debug("trajguard: TRAJGUARD_PROBE unset, plugin inactive")
        return
    from vllm import ModelRegistry

    for architecture, target in WRAPPED_ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    logger.info(
        "trajguard: guarding %s with probe %s", sorted(WRAPPED_ARCHITECTURES), settings.probe
    )
