"""``POST /v1/chat/completions``: chat messages through the chat template."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from jinja2 import TemplateError

from guard.chat import EncodedPrompt, encode_chat
from guard.errors import GuardValidationError
from guard.events import RequestOutput
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from server.serving import ChoiceState, OpenAIServing, RequestState
from server.sse import EventStream, sse_frame


class ServingChat(OpenAIServing):
    """``POST /v1/chat/completions``."""

    id_prefix = "chatcmpl"

    def _encode(self, request: ChatCompletionRequest) -> EncodedPrompt:
        try:
            return encode_chat(self.engine.tokenizer, request.chat_messages())
        except GuardValidationError:
            raise
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise GuardValidationError(
                f"the chat template rejected the messages: {str(exc)[:200]}", param="messages"
            ) from exc

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | EventStream:
        """A full response, or an :class:`EventStream` of ``chat.completion.chunk`` frames.

        Raises:
            APIError, GuardValidationError: mapped to HTTP errors by the app.
        """
        guard_options = await self._check(request)
        req = await self._submit(request, [self._encode(request)], guard_options)
        if request.stream:
            return self._event_stream(req, self._chat_frames(req, request.include_usage))
        await self._collect(req)
        choices = [
            ChatCompletionResponseChoice(
                index=c.index,
                message=ChatMessage(content="".join(c.text)),
                finish_reason=c.finish_reason,
                trajguard=c.info(with_scores=req.return_scores),
            )
            for c in req.choices
        ]
        return ChatCompletionResponse(
            id=req.id,
            created=req.created,
            model=self.engine.model_name,
            choices=choices,
            usage=self._usage(req),
        )

    def _chat_frames(self, req: RequestState, include_usage: bool) -> AsyncGenerator[str, None]:
        model = self.engine.model_name

        def frame(
            choices: list[ChatCompletionResponseStreamChoice], usage: UsageInfo | None = None
        ) -> str:
            return sse_frame(
                ChatCompletionStreamResponse(
                    id=req.id, created=req.created, model=model, choices=choices, usage=usage
                )
            )

        def chunk(choice: ChoiceState, out: RequestOutput) -> str:
            delta = DeltaMessage(content=out.text or None)
            return frame(
                [
                    ChatCompletionResponseStreamChoice(
                        index=choice.index,
                        delta=delta,
                        finish_reason=out.finish_reason,
                        trajguard=self._chunk_info(req, choice, out),
                    )
                ]
            )

        async def frames() -> AsyncGenerator[str, None]:
            for c in req.choices:  # the role comes first, as in OpenAI's streams
                yield frame(
                    [
                        ChatCompletionResponseStreamChoice(
                            index=c.index, delta=DeltaMessage(role="assistant", content="")
                        )
                    ]
                )
            usage = (lambda: frame([], self._usage(req))) if include_usage else None
            async with aclosing(self._stream_frames(req, chunk, usage)) as rest:
                async for f in rest:
                    yield f

        return frames()
