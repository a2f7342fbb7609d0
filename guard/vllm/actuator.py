"""vLLM logits processor that monitors guarded requests and forces their recovery (imports vLLM).

Load it with ``--logits-processors guard.vllm.actuator:TrajguardLogitsProcessor`` (it is
inert without ``TRAJGUARD_PROBE``). It implements the V1 model runner's interface
(``vllm.v1.sample.logits_processor``), so it is deliberately *not* registered under the
``vllm.logits_processors`` entry point: vLLM 0.32's V2 runner (the GPU default) rejects V1
processors found there at start-up, which would break every server in the venv. The model
wrapper refuses to start without this processor or under the V2 runner
(:func:`guard.vllm.settings.check_engine`).

Each step the model wrapper (:mod:`guard.vllm.models`) leaves one score per batch row;
this processor maps rows to requests through vLLM's ``BatchUpdate`` bookkeeping, runs each
guarded request's :class:`guard.vllm.session.RequestGuard` and, where a recovery is
planned, masks the row's logits so the planned token is the only one that can be sampled
(greedy or not). The step's events go to the event stream (:mod:`guard.vllm.channel`),
authenticated when ``TRAJGUARD_EVENTS_SECRET`` is set (loopback only otherwise).
"""

from __future__ import annotations

import logging
import threading

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from guard.monitor import resolve_threshold, with_calibrated_debounce
from guard.probe import LinearProbe
from guard.version import __version__
from guard.vllm._step import STEP_SCORES
from guard.vllm.channel import EventPublisher, probe_digest
from guard.vllm.session import RequestGuard
from guard.vllm.settings import PluginSettings, RequestOptions

logger = logging.getLogger(__name__)

_publisher_lock = threading.Lock()
_publisher: EventPublisher | None = None
_publisher_tried = False


def _shared_publisher(settings: PluginSettings, hello: dict) -> EventPublisher | None:
    """The process's event publisher (vLLM may build logits processors more than once)."""
    global _publisher, _publisher_tried
    with _publisher_lock:
        if not _publisher_tried and settings.events is not None:
            _publisher_tried = True
            try:
                _publisher = EventPublisher(
                    *settings.events, hello=hello, secret=settings.events_secret
                )
                if _publisher.authenticated:
                    logger.info("trajguard: publishing guard events on %s:%d", *_publisher.address)
                else:
                    logger.warning(
                        "trajguard: publishing guard events on %s:%d WITHOUT authentication: "
                        "set TRAJGUARD_EVENTS_SECRET here and on the proxy",
                        *_publisher.address,
                    )
            except OSError as exc:
                logger.warning(
                    "trajguard: cannot publish events on %s:%d (%s); guarding continues",
                    *settings.events,
                    exc,
                )
        return _publisher


def _is_first_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # parallel state not initialised
        return True


class TrajguardLogitsProcessor(LogitsProcessor):
    """Per-request debounce and forced recovery for requests with ``vllm_xargs.trajguard``."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        settings = PluginSettings.from_env()
        options = RequestOptions.from_extra_args(
            sampling_params.extra_args, guard_all=settings.guard_all
        )
        if options.active and settings.probe is None:
            raise ValueError("trajguard is not enabled on this server (TRAJGUARD_PROBE unset)")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.settings = PluginSettings.from_env()
        self.guards: dict[int, RequestGuard] = {}
        self.publisher: EventPublisher | None = None
        if self.settings.probe is None:
            return
        from vllm.tokenizers.registry import cached_tokenizer_from_config

        probe = LinearProbe.load(self.settings.probe)
        self.monitor = with_calibrated_debounce(self.settings.monitor, probe)
        self.probe_threshold = probe.threshold_
        self.threshold = resolve_threshold(
            config=self.settings.monitor.threshold, probe=probe.threshold_
        )
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        policy = self.settings.policy
        self.recovery_ids = tokenizer.encode(policy.recovery_text, add_special_tokens=False)
        self.refusal_ids = tokenizer.encode(policy.refusal_message, add_special_tokens=False)
        self.eos_id = tokenizer.eos_token_id
        if _is_first_rank():
            hello = {
                "hook_name": probe.hook_name,
                "d_model": probe.n_features_in_,
                "threshold": self.threshold,
                "probe_digest": probe_digest(probe.coef_, probe.intercept_),
                "model": vllm_config.model_config.served_model_name,
                "policy": policy.kind,
                "trajguard_version": __version__,
            }
            self.publisher = _shared_publisher(self.settings, hello)

    def is_argmax_invariant(self) -> bool:
        return False  # forcing a token changes greedy results

    def _new_guard(
        self, params: SamplingParams, _prompt_ids: list[int] | None, output_ids: list[int]
    ) -> RequestGuard | None:
        options = RequestOptions.from_extra_args(
            params.extra_args, guard_all=self.settings.guard_all
        )
        if not options.active:
            return None
        return RequestGuard(
            options,
            output_ids,
            monitor=self.monitor,
            policy=self.settings.policy,
            threshold=self.probe_threshold,
            recovery_ids=self.recovery_ids,
            refusal_ids=self.refusal_ids,
            eos_id=self.eos_id,
            on_monitor_error=self.settings.on_monitor_error,
        )

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.settings.probe is None:
            return
        ended = [
            self.guards[i].options.key
            for i in batch_update.removed
            if i in self.guards and self.guards[i].options.key is not None
        ]
        process_dict_updates(self.guards, batch_update, self._new_guard)
        if ended and self.publisher is not None:
            self.publisher.publish({"end": ended})

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guards:
            return logits
        scores = STEP_SCORES.take()
        missing = scores is None or scores.shape[0] != logits.shape[0]
        if missing:
            # Fail closed: the model is not the trajguard wrapper, or the runner changed.
            logger.error("trajguard: no probe scores for this step; stopping guarded requests")
            values = [float("nan")] * logits.shape[0]
        else:
            values = scores.tolist()
        events, rows, tokens = [], [], []
        for row, guard in self.guards.items():
            if missing and guard.acting:
                guard.abort()
            row_events, token = guard.step(values[row])
            events.extend(row_events)
            if token is not None:
                rows.append(row)
                tokens.append(token)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = float("-inf")
            logits[index, torch.tensor(tokens, device=logits.device)] = 0.0
        keyed = [e.to_json() for e in events if e.key is not None]
        if self.publisher is not None and keyed:
            self.publisher.publish({"ev": keyed})
        return logits
