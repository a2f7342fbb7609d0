"""The engine interface the server depends on.

``GuardEngine`` mirrors vLLM's ``EngineClient``: the serving layer only ever calls
``generate``/``abort``/``check_health``. The backends implement it:
:class:`server.local.LocalGuardEngine` (an in-process :class:`guard.GuardedEngine`) and
:class:`server.upstream.UpstreamVLLMEngine` (an upstream vLLM server);
:func:`server.backends.build_engine` picks one from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from guard.chat import EncodedPrompt
from guard.config import SamplingParams
from guard.events import RequestOutput


@dataclass(frozen=True, slots=True)
class GuardOptions:
    """Per-request guard switches (already checked against the server's config)."""

    guard: bool = True


class GuardEngine(ABC):
    """What the serving layer needs from a backend."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """The served model name."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + completion)."""

    @property
    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (chat template included)."""

    @property
    @abstractmethod
    def guarded(self) -> bool:
        """Whether a probe monitors requests."""

    @property
    @abstractmethod
    def errored(self) -> bool:
        """Whether the engine has failed and cannot serve."""

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """What decides the answers besides the request, reported in ``/v1/models``.

        A dict of :class:`server.protocol.TrajguardModelInfo`'s fields (weights
        fingerprint, probe digest, resolved threshold, guard config hash), or ``None``
        when the backend cannot tell (the default).
        """
        return None

    @abstractmethod
    async def start(self) -> None:
        """Start serving (called from the app's lifespan)."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop; live requests end with :class:`EngineDeadError`."""

    @abstractmethod
    async def generate(
        self,
        request_id: str,
        prompt: EncodedPrompt,
        params: SamplingParams,
        *,
        guard_options: GuardOptions,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and return the stream of its output deltas.

        Validation happens here, before anything is streamed, so a bad request is an
        HTTP error and never a broken stream.

        Raises:
            GuardValidationError: invalid prompt or parameters (400).
            ContextLengthError: the request does not fit the context (400).
            EngineDeadError: the engine cannot serve (503).
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; a no-op once it finished."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` unless the engine can serve."""
