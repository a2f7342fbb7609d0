"""trajguard inside vLLM: per-token probe scores in the model, recovery in a logits processor.

Only :mod:`guard.vllm.plugin`, :mod:`guard.vllm.models` and :mod:`guard.vllm.actuator`
import vLLM; they are loaded by vLLM itself (the ``vllm.general_plugins`` entry point and
``--logits-processors guard.vllm.actuator:TrajguardLogitsProcessor``), never by the rest of
trajguard. Supported: vLLM 0.32 with its V1 model runner (the CPU default; on GPU set
``VLLM_USE_V2_MODEL_RUNNER=0``). The other modules are plain Python shared with the proxy:

- :mod:`guard.vllm.settings`: plugin settings (environment) and per-request options
  (``vllm_xargs``).
- :mod:`guard.vllm.session`: one request's in-engine guard (debounce via
  :class:`guard.monitor.StepMonitor`, forced recovery tokens).
- :mod:`guard.vllm.channel`: the per-step score/trigger event stream (NDJSON over TCP).
"""
