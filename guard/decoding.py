"""Guarded decoding: one forward per step for all live requests, a probe score per token.

Each step reads like nanoGPT's ``generate``: forward the newest token of every row →
capture the probed residual stream → score → hand each row's score to its
:class:`guard.trajectory.GuardedRequest` (which judges, releases and decides recoveries)
→ carry out a recovery on the row's KV cache, or sample the next token. The engine owns
only batching, the KV cache, the forward pass and sampling; the guard's rules live in
:mod:`guard.trajectory`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from guard.arch import num_layers
from guard.capture import HiddenStateCapture
from guard.config import GuardConfig, SamplingParams
from guard.errors import GuardValidationError
from guard.events import GenerationResult, RequestOutput
from guard.hooks import resolve_hook_name
from guard.kv import BatchCache
from guard.monitor import resolve_threshold, with_calibrated_debounce
from guard.probe import LinearProbe
from guard.sampling import GREEDY_BELOW, make_generator, sample_next
from guard.trajectory import GuardedRequest, Recovery

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    """A request in the engine: its guard state plus its sampling RNG."""

    request: GuardedRequest
    generator: torch.Generator | None


class GuardedEngine:
    """Batched, KV-cached decoding with a per-step probe monitor and recovery policy.

    Requests join with :meth:`add_request` at any time (continuous batching) and leave
    when finished or aborted; :meth:`step` advances every live request by one token and
    returns what became releasable. Without a probe the engine decodes unguarded, which
    makes it its own baseline.

    Args:
        model: a supported HF causal LM (see :mod:`guard.arch`), in eval mode.
        tokenizer: its tokenizer.
        probe: fitted :class:`LinearProbe` (``None``: unguarded).
        config: monitor, policy, holdback and failure settings.
        strict_probe: require the probe's recorded weight fingerprint to match ``model``.

    Raises:
        ProbeMismatchError: the probe does not fit the model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        probe: LinearProbe | None = None,
        config: GuardConfig | None = None,
        *,
        strict_probe: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.probe = probe
        config = config or GuardConfig()
        self.config = replace(config, monitor=with_calibrated_debounce(config.monitor, probe))
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {e for e in eos_ids if e is not None}
        self.hook_name: str | None = None
        if probe is not None:
            probe.check_compatible(model, strict_weights=strict_probe)
            self.hook_name = resolve_hook_name(probe.hook_name, num_layers(model))
        self._probe_threshold = None if probe is None else probe.threshold_
        self.threshold = resolve_threshold(
            config=self.config.monitor.threshold, probe=self._probe_threshold
        )
        self._waiting: list[_Row] = []
        self._aborted: set[str] = set()
        self._rows: list[_Row] = []  # row i of the batch cache
        self._ids: set[str] = set()
        self._batch = BatchCache()
        self._lock = threading.Lock()

    # ---- request lifecycle --------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        prefill_ids: Sequence[int] = (),
        guard: bool = True,
    ) -> None:
        """Queue a request; it joins the batch at the next :meth:`step`.

        Args:
            request_id: unique among live requests.
            prompt_ids: tokenized prompt (chat template applied).
            params: sampling parameters.
            prefill_ids: client-written start of the answer; monitored like generated
                tokens (prefilling is an attack surface) and never sent back.
            guard: monitor this request (needs a probe).

        Raises:
            GuardValidationError: empty prompt, duplicate id, bad token ids.
            ContextLengthError: prompt + max_tokens exceeds the context window.
        """
        params = params or SamplingParams()
        request = GuardedRequest(
            request_id,
            prompt_ids,
            params,
            tokenizer=self.tokenizer,
            config=self.config,
            eos_ids=self.eos_ids,
            threshold=self._probe_threshold,
            guarded=guard and self.probe is not None,
            prefill_ids=prefill_ids,
            max_context=self.max_context,
            vocab_size=int(self.model.config.vocab_size),
        )
        row = _Row(request, make_generator(params, self.device))
        with self._lock:
            if request_id in self._ids:
                raise GuardValidationError(
                    f"request id {request_id!r} is already live", param="request_id"
                )
            self._ids.add(request_id)
            self._waiting.append(row)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache at the next step (no output is emitted)."""
        with self._lock:
            if request_id in self._ids:
                self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or decoding."""
        with self._lock:
            return bool(self._ids)

    @property
    def num_running(self) -> int:
        """Requests in the decoding batch."""
        return len(self._rows)

    # ---- one step ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, decode one token for every live request, release."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
            aborted, self._aborted = self._aborted, set()
        self._drop_aborted(aborted)
        touched = [row.request for row in self._rows]
        for row in waiting:
            if row.request.request_id not in aborted:
                touched.append(row.request)
                self._admit(row)
        if self._rows:
            self._decode()
        outputs = []
        for request in touched:
            out = request.take_output()
            if out is not None:
                outputs.append(out)
            if request.finished:
                with self._lock:
                    self._ids.discard(request.request_id)
        return outputs

    def _drop_aborted(self, aborted: set[str]) -> None:
        if not aborted:
            return
        rows = [i for i, row in enumerate(self._rows) if row.request.request_id in aborted]
        self._batch.remove(rows)
        self._rows = [row for row in self._rows if row.request.request_id not in aborted]
        with self._lock:
            self._ids -= aborted

    def _forward(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        capture_all: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model; return last-position logits ``[batch, vocab]`` and captured states.

        States are ``[batch, d_model]`` for the newest position, or ``[batch, pos, d_model]``
        with ``capture_all``; ``None`` when no probe is attached.
        """
        kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if self.hook_name is None:
            return self.model(input_ids, **kwargs).logits[:, -1, :], None
        with HiddenStateCapture(
            self.model, self.hook_name, last_token_only=not capture_all
        ) as capture:
            logits = self.model(input_ids, **kwargs).logits[:, -1, :]
        return logits, capture.cache[self.hook_name]

    def _extend(
        self, cache: DynamicCache, token_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ``token_ids`` to a single-sequence cache; logits ``[vocab]``, states ``[n, d_model]``."""
        past = cache.get_seq_length()
        n = len(token_ids)
        logits, states = self._forward(
            torch.tensor([token_ids], device=self.device),
            cache,
            attention_mask=torch.ones(1, past + n, dtype=torch.long, device=self.device),
            position_ids=torch.arange(past, past + n, device=self.device).unsqueeze(0),
            capture_all=True,
        )
        return logits[0], None if states is None else states[0]

    def _scores(self, states: torch.Tensor | None) -> list[float] | None:
        """Probe scores of ``[n, d_model]`` states; ``None`` when scoring raised.

        NaN and infinite scores are passed on: the request's rules treat them as failures.
        """
        if states is None or self.probe is None:
            return None
        try:
            return self.probe.score_tensor(states).tolist()
        except Exception:
            logger.exception("probe scoring failed")
            return None

    def _admit(self, row: _Row) -> None:
        """Prefill the prompt (+ assistant prefill), judge prefill and history, sample a first token."""
        request = row.request
        cache = DynamicCache()
        logits, states = self._extend(cache, request.context_ids)
        if request.guarded and (request.n_prefill or request.history_spans):
            prefill = self._scores(states[len(request.prompt_ids) :]) if request.n_prefill else []
            history = [self._scores(states[a:b]) for a, b in request.history_spans]
            recovery = request.judge_context(prefill, history)
            if recovery is not None:
                logits = self._carry_out(request, recovery, cache)
        if request.finished:
            return
        self._sample(row, logits)
        if not request.finished:
            self._batch.append(cache)
            self._rows.append(row)

    def _decode(self) -> None:
        """One forward for all rows: score each row's newest token, then act or sample."""
        mask, positions = self._batch.step_inputs()
        newest = torch.tensor(
            [[row.request.response_ids[-1]] for row in self._rows], device=self.device
        )  # [batch, 1]
        logits, states = self._forward(
            newest, self._batch.cache, attention_mask=mask, position_ids=positions
        )
        self._batch.commit_step(mask)
        scores = self._scores(states)  # one per row, or None
        greedy = logits.argmax(dim=-1).tolist()  # [batch]
        leaving: dict[int, Recovery | None] = {}  # row -> recovery (None: finished)
        for i, row in enumerate(self._rows):
            request = row.request
            if request.guarded:
                recovery = request.observe(None if scores is None else scores[i])
                if recovery is not None or request.finished:
                    leaving[i] = recovery if not request.finished else None
                    continue
            if request.params.temperature < GREEDY_BELOW and not request.banned_next():
                request.append(greedy[i])
            else:
                self._sample(row, logits[i])
            if request.finished:
                leaving[i] = None
        if not leaving:
            return
        # Rows that recover continue from an edited copy of their cache.
        recovering = {i: self._batch.extract(i) for i, rec in leaving.items() if rec is not None}
        self._batch.remove(list(leaving))
        rows, self._rows = self._rows, [row for i, row in enumerate(self._rows) if i not in leaving]
        for i, cache in recovering.items():
            row = rows[i]
            logits = self._carry_out(row.request, leaving[i], cache)
            if row.request.finished:
                continue
            self._sample(row, logits)
            if not row.request.finished:
                self._batch.append(cache)
                self._rows.append(row)

    def _carry_out(
        self, request: GuardedRequest, recovery: Recovery, cache: DynamicCache
    ) -> torch.Tensor | None:
        """Rewind ``cache`` as ``recovery`` says; next-token logits (``None``: finished)."""
        if recovery.kind == "stop":
            return None
        context_len = len(request.prompt_ids) + recovery.keep
        if recovery.kind == "rollback":
            cache.crop(context_len - cache.get_seq_length())
            logits, states = self._extend(cache, list(recovery.inject_ids))
            request.injected(self._scores(states))
            return None if request.finished else logits
        # resample: re-feed the last kept context token to get its logits again
        cache.crop(context_len - 1 - cache.get_seq_length())
        logits, _ = self._extend(cache, [request.context_ids[-1]])
        return logits

    def _sample(self, row: _Row, logits: torch.Tensor) -> None:
        request = row.request
        token = sample_next(
            logits, request.params, generator=row.generator, banned=request.banned_next()
        )
        request.append(token)

    # ---- convenience -------------------------------------------------------------------

    def run(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding outputs as they come."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: Iterable[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        prefills: Iterable[Sequence[int]] | None = None,
    ) -> list[GenerationResult]:
        """Decode a batch of prompts to completion; results in prompt order."""
        prompts = list(prompts)
        prefills = list(prefills) if prefills is not None else [()] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, prefill in zip(ids, prompts, prefills):
            self.add_request(rid, prompt, params, prefill_ids=prefill)
        results = {rid: GenerationResult(rid) for rid in ids}
        for out in self.run():
            results[out.request_id].absorb(out)
        return [results[rid] for rid in ids]
