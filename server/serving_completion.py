"""``POST /v1/completions``: raw prompts (text or token ids), ``n`` choices per prompt."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from guard.chat import EncodedPrompt, split_open_assistant_turn
from guard.events import RequestOutput
from server.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from server.serving import ChoiceState, OpenAIServing, RequestState
from server.sse import EventStream, sse_frame


class ServingCompletion(OpenAIServing):
    """``POST /v1/completions`` (a prompt list gives ``n`` choices per prompt)."""

    id_prefix = "cmpl"

    def _encode(self, prompt: str | list[int]) -> EncodedPrompt:
        """Prompt ids; the text of an open assistant turn at the end is monitored prefill."""
        tokenizer = self.engine.tokenizer
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        return split_open_assistant_turn(tokenizer, ids)

    async def create_completion(
        self, request: CompletionRequest
    ) -> CompletionResponse | EventStream:
        """A full response, or an :class:`EventStream` of ``text_completion`` frames.

        Raises:
            APIError, GuardValidationError: mapped to HTTP errors by the app.
        """
        guard_options = await self._check(request)
        req = await self._submit(
            request, [self._encode(p) for p in request.prompts()], guard_options
        )
        if request.stream:
            return self._event_stream(req, self._completion_frames(req, request.include_usage))
        await self._collect(req)
        choices = [
            CompletionResponseChoice(
                index=c.index,
                text="".join(c.text),
                finish_reason=c.finish_reason,
                trajguard=c.info(with_scores=req.return_scores),
            )
            for c in req.choices
        ]
        return CompletionResponse(
            id=req.id,
            created=req.created,
            model=self.engine.model_name,
            choices=choices,
            usage=self._usage(req),
        )

    def _completion_frames(
        self, req: RequestState, include_usage: bool
    ) -> AsyncGenerator[str, None]:
        model = self.engine.model_name

        def frame(choices: list[CompletionResponseChoice], usage: UsageInfo | None = None) -> str:
            return sse_frame(
                CompletionStreamResponse(
                    id=req.id, created=req.created, model=model, choices=choices, usage=usage
                )
            )

        def chunk(choice: ChoiceState, out: RequestOutput) -> str:
            return frame(
                [
                    CompletionResponseChoice(
                        index=choice.index,
                        text=out.text,
                        finish_reason=out.finish_reason,
                        trajguard=self._chunk_info(req, choice, out),
                    )
                ]
            )

        usage = (lambda: frame([], self._usage(req))) if include_usage else None
        return self._stream_frames(req, chunk, usage)
