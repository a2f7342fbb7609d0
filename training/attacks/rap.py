"""Rank-assisted prefilling (RAP, Vega & Singh, arXiv 2512.05518): a prefill the model ranks.

The attacker builds the assistant prefill token by token. At each step it takes the
attacked model's ``top_k`` next tokens (k = 20 in the paper) and keeps the one that scores
highest on its harm signal, so every prefilled token is one the model itself ranks high,
yet the path steers away from the refusal tokens a deep-aligned model puts its mass on.

Harm signal: the attacked model's log-likelihood of a harmful target continuation given
prompt + prefix + candidate. The target is the prompt's harmful response
(:attr:`AttackContext.responses`) read position by position: after the candidate for step
``t`` the prefill holds ``t + 1`` tokens, so the target is response tokens ``t + 1 ..
t + target_tokens`` (the response's last ``target_tokens`` once the prefill outruns it). The
attacker thus prefers the candidate after which the model is readiest to say the next stretch
of a harmful answer. Special tokens (end of turn, padding) are never chosen; a step whose
top-k holds nothing else ends the prefix early (``meta.k_eff``).

The search is greedy and deterministic, and a step never looks at the final length, so the
``k = 5`` prefix is the first 5 tokens of the ``k = 20`` one: each prompt is searched once, to
the longest ``k``, and sliced. Cost per prompt and step: one forward pass of ``top_k`` rows of
``1 + target_tokens`` tokens over the cached prompt + prefix.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedModel

from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    run_attack,
)
from training.attacks.prefill import plot_prefill

DEFAULT_RAP_KS: tuple[int, ...] = (5, 10, 20)
DEFAULT_TOP_K = 20
DEFAULT_TARGET_TOKENS = 16

PrefixCache = dict[tuple, tuple[int, "RapPrefix"]]
"""Built prefixes per (model, prompt, target, settings): ``(length asked for, prefix)``."""


@dataclass(frozen=True, slots=True)
class RapPrefix:
    """A RAP prefill and, per token, its rank and harm score at its step.

    Attributes:
        ids: The prefill's token ids.
        ranks: Rank of each chosen token in the model's next-token order (0: its top-1).
        scores: Target log-likelihood (sum, nats) after each chosen token.
    """

    ids: list[int]
    ranks: list[int]
    scores: list[float]

    def head(self, n: int) -> RapPrefix:
        """The first ``n`` tokens (the prefix a search to length ``n`` builds)."""
        return RapPrefix(self.ids[:n], self.ranks[:n], self.scores[:n])


def target_window(response_ids: Sequence[int], step: int, n_tokens: int) -> list[int]:
    """The harmful target scored at ``step``: response tokens after the ``step + 1`` prefilled."""
    start = min(step + 1, max(len(response_ids) - n_tokens, 0))
    return list(response_ids[start : start + n_tokens])


@torch.no_grad()
def rap_prefix(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    length: int,
    top_k: int = DEFAULT_TOP_K,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    skip_ids: Collection[int] = (),
) -> RapPrefix:
    """Build a RAP prefill of up to ``length`` tokens (see the module docstring).

    Args:
        model: The attacked causal LM.
        prompt_ids: Chat-templated prompt (ends with the generation prompt).
        response_ids: The harmful response whose windows are the targets.
        length: Tokens to prefill.
        top_k: Candidates per step: the model's ``top_k`` next tokens.
        target_tokens: Target window length.
        skip_ids: Never chosen (the tokenizer's special tokens).

    Returns:
        The prefix; shorter than ``length`` only where a step's top-k held only ``skip_ids``.

    Raises:
        ValueError: ``length`` < 0, ``top_k`` < 1, ``target_tokens`` < 1 or an empty prompt.
    """
    if length < 0 or top_k < 1 or target_tokens < 1 or not prompt_ids:
        raise ValueError(
            f"need length >= 0, top_k >= 1, target_tokens >= 1 and a prompt; got "
            f"length={length}, top_k={top_k}, target_tokens={target_tokens}, "
            f"{len(prompt_ids)} prompt tokens"
        )
    device = next(model.parameters()).device
    ids, ranks, scores = [], [], []
    if length == 0:
        return RapPrefix(ids, ranks, scores)
    out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
    cache, next_logits = out.past_key_values, out.logits[0, -1]  # cache: prompt + prefix
    skip = torch.tensor(sorted(set(skip_ids)), dtype=torch.long, device=device)
    for step in range(length):
        top = torch.topk(next_logits.float(), min(top_k, next_logits.shape[-1])).indices
        keep = ~torch.isin(top, skip)
        if not keep.any():
            break
        rank_of, candidates = torch.nonzero(keep).flatten(), top[keep]  # [c]
        target = target_window(response_ids, step, target_tokens)
        # One pass for every candidate: rows [candidate, *target] over the shared cache.
        cache.batch_repeat_interleave(len(candidates))
        rows = torch.cat(
            [
                candidates[:, None],
                torch.tensor([target], dtype=torch.long, device=device).expand(len(candidates), -1),
            ],
            dim=1,
        )  # [c, 1 + T]
        logits = model(input_ids=rows, past_key_values=cache, use_cache=True).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [c, T, vocab]
        loglik = logprobs.gather(-1, rows[:, 1:, None]).squeeze(-1).sum(-1)  # [c]
        best = int(torch.argmax(loglik))  # first (highest ranked) on ties
        ids.append(int(candidates[best]))
        ranks.append(int(rank_of[best]))
        scores.append(float(loglik[best]))
        # Keep the winner's row and drop its target: the cache is prompt + prefix again.
        cache.batch_select_indices(torch.tensor([best], device=device))
        if target:
            cache.crop(-len(target))
        next_logits = logits[best, 0]  # the model's next-token logits after the winner
    return RapPrefix(ids, ranks, scores)


def rap_cases(
    ctx: AttackContext,
    ks: Sequence[int] = DEFAULT_RAP_KS,
    top_k: int = DEFAULT_TOP_K,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    *,
    cache: PrefixCache | None = None,
) -> list[AttackCase]:
    """One case per (prompt, k), cell ``{"k": k}`` as in the prefill attack.

    Each prompt is searched once, to ``max(ks)``, and the shorter prefixes are its heads.
    ``cache`` keeps built prefixes across calls (e.g. the seeds of one bench run).

    Raises:
        ValueError: No ``ks`` or a negative one.
    """
    if not ks or min(ks) < 0:
        raise ValueError(f"prefill lengths must be non-negative, got {list(ks)}")
    tok, cache = ctx.lm.tokenizer, {} if cache is None else cache
    longest, cases = max(ks), []
    for i, response in enumerate(ctx.responses):
        response_ids = tok.encode(response.text, add_special_tokens=False)
        key = (ctx.lm.model_id, tuple(ctx.prompt_ids[i]), tuple(response_ids), top_k, target_tokens)
        if key not in cache or cache[key][0] < longest:
            built = rap_prefix(
                ctx.lm.model,
                ctx.prompt_ids[i],
                response_ids,
                length=longest,
                top_k=top_k,
                target_tokens=target_tokens,
                skip_ids=tok.all_special_ids,
            )
            cache[key] = (longest, built)
        prefix = cache[key][1]
        for k in ks:
            head = prefix.head(k)
            meta = {
                "k_eff": len(head.ids),
                "top_k": top_k,
                "ranks": head.ranks,
                "target_loglik": head.scores[-1] if head.scores else None,
                "response_source": response.source,
            }
            cases.append(AttackCase(i, {"k": k}, head.ids, meta))
    return cases


def run_rap(
    config: AttackConfig,
    ks: Sequence[int] = DEFAULT_RAP_KS,
    top_k: int = DEFAULT_TOP_K,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    *,
    progress: bool = True,
) -> AttackReport:
    """Run the RAP attack for every prefill length k in ``ks``."""
    config.params = {
        **config.params,
        "ks": list(ks),
        "top_k": top_k,
        "target_tokens": target_tokens,
    }
    build = partial(rap_cases, ks=ks, top_k=top_k, target_tokens=target_tokens)
    return run_attack(config, build, group_by=[("k",)], plot=plot_prefill, progress=progress)
