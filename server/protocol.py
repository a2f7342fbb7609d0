"""Wire models of the OpenAI-compatible API (requests, responses, stream chunks, errors)."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guard.config import SamplingParams
from guard.errors import GuardValidationError

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# NOTE: like vLLM's _SAMPLING_EPS: a temperature or top_p below it means greedy. Subnormal
# values otherwise reach guard.sampling as inf logits (temperature) or an empty nucleus
# (top_p rounds to 0 in float32), and torch.multinomial raises inside the engine step.
SAMPLING_EPS = 1e-5


def _omit_none(value: Any) -> bool:
    return value is None


class OpenAIBaseModel(BaseModel):
    """Base of request models: unknown fields are accepted and logged (names only)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _log_extra_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if isinstance(data, dict):
            known = {name for name in cls.model_fields} | {
                f.alias for f in cls.model_fields.values() if f.alias
            }
            extra = sorted(str(k)[:40] for k in data.keys() - known)
            if extra:
                logger.warning("fields present in the request but ignored: %s", extra[:10])
        return result


# ---- errors ----------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """``{"error": {message, type, param, code}}``, OpenAI's error body."""

    error: ErrorInfo


# ---- requests ---------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class TrajguardOptions(BaseModel):
    """The ``trajguard`` request extension.

    Attributes:
        guard: monitor this request (``false`` only where the server allows it).
        return_scores: add per-token P(unsafe) to each choice (and each stream chunk).
    """

    model_config = ConfigDict(extra="forbid")

    guard: bool = True
    return_scores: bool = False


class GenerationRequest(OpenAIBaseModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM extension
    trajguard: TrajguardOptions = Field(default_factory=TrajguardOptions)

    # Declared so a request asking for them fails loudly instead of being ignored.
    unsupported: ClassVar[tuple[str, ...]] = (
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
    )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Reject options the guarded decoder cannot honour.

        Raises:
            GuardValidationError: an unsupported option has a non-default value.
        """
        for name in self.unsupported:
            if getattr(self, name, None):
                raise GuardValidationError(f"{name} is not supported by trajguard", param=name)

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise GuardValidationError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return tuple(stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(
        self, *, max_tokens: int, default_temperature: float, choice: int = 0
    ) -> SamplingParams:
        """Engine parameters of one choice (choice ``i`` of a seeded request uses ``seed + i``).

        Raises:
            GuardValidationError: a value is out of range.
        """
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        temperature = default_temperature if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if 0.0 < temperature < SAMPLING_EPS or 0.0 < top_p < SAMPLING_EPS:
            temperature = 0.0  # top-p this small keeps only the likeliest token: greedy
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=self.stop_strings(),
            ignore_eos=self.ignore_eos,
        )


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessageParam(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as plain text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" or part.text is None for part in self.content):
            raise GuardValidationError("only text content parts are supported", param="messages")
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool | None = None  # vLLM extension

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise GuardValidationError("tools are not supported by trajguard", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise GuardValidationError(
                "only response_format type 'text' is supported", param="response_format"
            )
        ends_with_assistant = self.messages[-1].role == "assistant"
        if self.continue_final_message and not ends_with_assistant:
            raise GuardValidationError(
                "continue_final_message needs a final assistant message",
                param="continue_final_message",
            )
        if self.continue_final_message is False and ends_with_assistant:
            # NOTE: a trailing assistant message is always continued, as monitored prefill.
            raise GuardValidationError(
                "a final assistant message is always continued (monitored prefill); "
                "continue_final_message=false is not supported",
                param="continue_final_message",
            )

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as ``encode_chat`` takes them (``developer`` becomes ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    unsupported: ClassVar[tuple[str, ...]] = GenerationRequest.unsupported + ("echo", "suffix")

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise GuardValidationError("best_of is not supported (must equal n)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise GuardValidationError("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


# ---- responses --------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class InterventionInfo(BaseModel):
    """One recovery the guard applied (indices count completion tokens).

    ``kept`` tokens were released before it; ``injected`` recovery tokens follow them
    (the guard's words, not the model's); ``discarded`` unreleased tokens were dropped.
    ``turn`` is set when a client-written assistant turn of the prompt fired (0-based);
    ``step`` then indexes that turn's tokens.
    """

    step: int
    score: float
    action: str
    kept: int
    discarded: int
    injected: int = 0
    turn: int | None = Field(None, exclude_if=_omit_none)


class TrajguardChoiceInfo(BaseModel):
    """The ``trajguard`` extension of a choice: what the guard saw and did."""

    guarded: bool
    triggered: bool = False
    trigger_index: int | None = None
    max_score: float | None = None
    action: str | None = None
    recoveries: int = 0
    interventions: list[InterventionInfo] | None = Field(None, exclude_if=_omit_none)
    scores: list[float | None] | None = Field(None, exclude_if=_omit_none)


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: str | None = None
    trajguard: TrajguardChoiceInfo | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    trajguard: TrajguardChoiceInfo | None = Field(None, exclude_if=_omit_none)


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_omit_none)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    trajguard: TrajguardChoiceInfo | None = Field(None, exclude_if=_omit_none)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_omit_none)


class TrajguardModelInfo(BaseModel):
    """The ``trajguard`` extension of a model card: what decides the answers besides the
    request, so a client can tell a retrained model or a changed guard behind the same id.

    Attributes:
        model_fingerprint: :func:`guard.models.model_fingerprint` of the served weights.
        probe_digest: Hash of the probe's scoring state (``None``: unguarded).
        threshold: The resolved trigger threshold (``None``: unguarded).
        guard_config: Hash of the full :class:`guard.GuardConfig` in use.
    """

    model_fingerprint: str
    probe_digest: str | None = None
    threshold: float | None = None
    guard_config: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "trajguard"
    max_model_len: int | None = None
    trajguard: TrajguardModelInfo | None = Field(None, exclude_if=_omit_none)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
