"""Probe-aware (white-box) insertion: a GCG-style search over the inserted span's tokens.

The attacker knows the guard's probe. As in the insertion attack
(:mod:`training.attacks.insert`) the assistant prefill is ``refusal[:p] + span``, and the
``m`` span tokens are optimised by greedy coordinate gradient search (GCG, Zou et al. 2023)
on

    loss = NLL(target | prompt, refusal[:p], span) + lam * mean probe logit(span + target),

where the target is the next ``target_tokens`` tokens of the prompt's harmful response
after the span (the writer's text, ``ctx.responses[i]``). The probe window covers the span
too because the guard scores the client's prefill (``monitor_prefill``). The span variant
(not a user-prompt suffix) is the one implemented: it is the surface the guard is built for.

Each step takes one gradient of the loss w.r.t. the one-hot span through the input
embeddings, keeps the ``top_k`` substitutions per position, scores ``candidates`` random
single-token swaps by forward pass and moves to the best one if it lowers the loss
(best-so-far: the loss never rises). The budget is ``steps * candidates`` forward
evaluations (plus one gradient per step). Step 0 is the unoptimised span, i.e. the
insertion attack's span at the same position (``init="response"``) or seeded random
tokens (``init="random"``).

States at the probe's hook come from :class:`guard.capture.HiddenStateCapture`, the
guard's own hooks. HF ``hidden_states[L + 1]`` equals ``blocks.L.hook_resid_post`` only
for ``L < n_layers - 1``: the last entry is taken after the final norm.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from guard import GuardConfig, LinearProbe
from guard.capture import HiddenStateCapture
from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    CellSummary,
    run_attack,
)
from training.attacks.insert import prompt_refusals
from training.common.insertion import Position, insertion_point, word_starts
from training.common.plots import Curve, plot_curves

logger = logging.getLogger(__name__)

DEFAULT_STEPS: tuple[int, ...] = (0, 8, 32)
DEFAULT_CANDIDATES = 16
DEFAULT_TOP_K = 32
DEFAULT_LAMBDA = 1.0
DEFAULT_SPAN = 16
DEFAULT_TARGET_TOKENS = 24
DEFAULT_POSITION: Position = GuardConfig().holdback  # as the bench's ``adaptive`` cell
INITS: tuple[str, ...] = ("response", "random")


@dataclass(frozen=True, slots=True)
class SpanStep:
    """The best span after ``step`` steps and its loss terms (``wall_s``: since the start)."""

    step: int
    span_ids: tuple[int, ...]
    loss: float
    nll: float
    probe_logit: float
    wall_s: float


@dataclass(frozen=True)
class SpanSearch:
    """Result of :func:`optimise_span`: ``trace[s]`` is the best span after ``s`` steps."""

    trace: list[SpanStep]
    evaluations: int

    @property
    def span_ids(self) -> list[int]:
        """The final (best) span."""
        return list(self.trace[-1].span_ids)


def hook_states(
    model: PreTrainedModel,
    hook_name: str,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, states at hook_name)`` of one forward pass, differentiable.

    ``states`` is ``[batch, pos, d_model]``: exactly what the guard's probe reads.
    """
    with HiddenStateCapture(model, hook_name, detach=False) as capture:
        out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep)
        return out.logits, capture[hook_name]


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, n_rows: int) -> torch.Tensor:
    """Bool mask over embedding rows: real tokenizer tokens that are not special."""
    mask = torch.zeros(n_rows, dtype=torch.bool)
    mask[: min(len(tokenizer), n_rows)] = True
    mask[[i for i in tokenizer.all_special_ids if i < n_rows]] = False
    return mask


class _Objective:
    """NLL of the target plus ``lam`` times the mean probe logit over span and target."""

    def __init__(
        self,
        model: PreTrainedModel,
        probe: LinearProbe,
        prefix_ids: Sequence[int],
        target_ids: Sequence[int],
        lam: float,
    ) -> None:
        self.model, self.hook, self.lam = model, probe.hook_name, lam
        device = next(model.parameters()).device
        self.prefix = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)
        self.target = torch.tensor(list(target_ids), dtype=torch.long, device=device)
        self.weight = torch.as_tensor(probe.coef_, dtype=torch.float32, device=device)
        self.bias = float(probe.intercept_)

    def _terms(self, logits: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_target = len(self.target)
        pred = logits[:, -n_target - 1 : -1].float()  # [batch, n_target, vocab]
        nll = F.cross_entropy(
            pred.transpose(1, 2), self.target.expand(len(pred), -1), reduction="none"
        ).mean(1)
        window = states[:, len(self.prefix) :].float()  # span + target positions
        logit = (window @ self.weight + self.bias).mean(1)
        return nll + self.lam * logit, nll, logit

    def gradient(self, span: torch.Tensor) -> torch.Tensor:
        """d loss / d one-hot span, ``[m, vocab rows]``."""
        embed = self.model.get_input_embeddings()
        one_hot = F.one_hot(span, embed.weight.shape[0]).to(embed.weight.dtype)
        one_hot.requires_grad_(True)
        embeds = torch.cat(
            [embed(self.prefix).detach(), one_hot @ embed.weight, embed(self.target).detach()]
        )
        logits, states = hook_states(
            self.model,
            self.hook,
            inputs_embeds=embeds[None],
            logits_to_keep=len(self.target) + 1,
        )
        loss = self._terms(logits, states)[0].sum()
        (grad,) = torch.autograd.grad(loss, one_hot)
        return grad.float()

    @torch.no_grad()
    def evaluate(self, spans: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
        """``(loss, nll, probe logit)`` per span row, each ``[n]``."""
        out: list[tuple[torch.Tensor, ...]] = []
        for chunk in spans.split(batch):
            ids = torch.cat(
                [self.prefix.expand(len(chunk), -1), chunk, self.target.expand(len(chunk), -1)],
                dim=1,
            )
            logits, states = hook_states(
                self.model, self.hook, input_ids=ids, logits_to_keep=len(self.target) + 1
            )
            out.append(self._terms(logits, states))
        return tuple(torch.cat(parts) for parts in zip(*out))


def optimise_span(
    model: PreTrainedModel,
    probe: LinearProbe,
    prefix_ids: Sequence[int],
    span_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    steps: int,
    candidates: int = DEFAULT_CANDIDATES,
    top_k: int = DEFAULT_TOP_K,
    lam: float = DEFAULT_LAMBDA,
    seed: int = 0,
    allowed: torch.Tensor | None = None,
    eval_batch: int = 32,
) -> SpanSearch:
    """Greedy coordinate gradient search over ``span_ids`` (deterministic given ``seed``).

    Args:
        model: The attacked causal LM (its weights are never changed).
        probe: The guard's probe (attacker's knowledge).
        prefix_ids: Everything before the span: chat prompt and ``refusal[:p]``.
        span_ids: The initial span (its length is kept).
        target_ids: Harmful continuation whose NLL is minimised.
        steps: Coordinate steps.
        candidates: Random single-token swaps scored per step.
        top_k: Substitutions kept per position from the gradient.
        lam: Weight of the mean probe logit over span and target.
        seed: Seed of the swaps.
        allowed: Bool mask of tokens a swap may use (default: all embedding rows).
        eval_batch: Candidates per forward pass.

    Returns:
        The trace: ``steps + 1`` entries, the best span so far after each step.

    Raises:
        ValueError: An empty span or target, or a non-positive budget setting.
    """
    if not span_ids or not target_ids:
        raise ValueError("the span and the target need at least one token each")
    if steps < 0 or candidates < 1 or top_k < 1 or eval_batch < 1:
        raise ValueError("steps must be >= 0; candidates, top_k and eval_batch >= 1")
    start = time.perf_counter()
    objective = _Objective(model, probe, prefix_ids, target_ids, lam)
    generator = torch.Generator().manual_seed(seed)
    span = torch.tensor(list(span_ids), dtype=torch.long, device=objective.prefix.device)
    loss, nll, logit = (t[0].item() for t in objective.evaluate(span[None], eval_batch))
    trace = [SpanStep(0, tuple(span.tolist()), loss, nll, logit, time.perf_counter() - start)]
    m = len(span)
    for step in range(1, steps + 1):
        grad = objective.gradient(span).cpu()
        if allowed is not None:
            grad[:, ~allowed[: grad.shape[1]]] = float("inf")
        top = (-grad).topk(min(top_k, grad.shape[1]), dim=1).indices  # [m, k]
        pos = torch.randint(m, (candidates,), generator=generator)
        pick = torch.randint(top.shape[1], (candidates,), generator=generator)
        swaps = span.cpu().repeat(candidates, 1)
        swaps[torch.arange(candidates), pos] = top[pos, pick]
        losses, nlls, logits = objective.evaluate(swaps.to(span.device), eval_batch)
        best = int(losses.argmin())
        if losses[best].item() < loss:
            span = swaps[best].to(span.device)
            loss, nll, logit = losses[best].item(), nlls[best].item(), logits[best].item()
        trace.append(
            SpanStep(step, tuple(span.tolist()), loss, nll, logit, time.perf_counter() - start)
        )
    return SpanSearch(trace, evaluations=steps * candidates)


def _initial_span(
    response: list[int], m: int, init: str, allowed: torch.Tensor, seed: int
) -> list[int]:
    """The insertion attack's span (``response``) or ``m`` seeded random allowed tokens."""
    if init == "response":
        return response[:m]
    pool = allowed.nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (m,), generator=g)].tolist()


def probe_aware_cases(
    ctx: AttackContext,
    probe: LinearProbe,
    steps: Sequence[int] = DEFAULT_STEPS,
    candidates: int = DEFAULT_CANDIDATES,
    *,
    top_k: int = DEFAULT_TOP_K,
    lam: float = DEFAULT_LAMBDA,
    length: int = DEFAULT_SPAN,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    position: Position = DEFAULT_POSITION,
    refusal: str = "pool",
    init: str = "response",
) -> list[AttackCase]:
    """One case per (prompt, budget ``steps``), prefill ``refusal[:p] + optimised span``.

    The search runs once per prompt to ``max(steps)`` and each budget takes its snapshot,
    so the budgets form a curve. The target is the response's next ``target_tokens``
    tokens after the span (``init="random"``: its first ones). Prompts whose position lies
    past the refusal or whose response leaves no target token are skipped (logged).

    Raises:
        ValueError: Bad budgets, span/target lengths or ``init``.
    """
    if not steps or min(steps) < 0:
        raise ValueError(f"budgets (steps) must be non-negative, got {list(steps)}")
    if length < 1 or target_tokens < 1 or init not in INITS:
        raise ValueError(f"need length, target_tokens >= 1 and init in {INITS}")
    tok, model = ctx.lm.tokenizer, ctx.lm.model
    allowed = allowed_tokens(tok, model.get_input_embeddings().weight.shape[0])
    cases: list[AttackCase] = []
    snapshots: dict[int, list[SpanStep]] = {s: [] for s in steps}
    skipped = 0
    for i, (ids, kind) in enumerate(prompt_refusals(ctx, refusal)):
        at = insertion_point(word_starts(tok, ids), position)
        text = ctx.responses[i].text.strip()
        response = tok.encode(" " + text if at else text, add_special_tokens=False)
        seed = random.Random(f"probe_aware:{ctx.config.seed}:{i}").getrandbits(31)
        span = _initial_span(response, length, init, allowed, seed)
        skip = len(span) if init == "response" else 0
        target = response[skip : skip + target_tokens]
        if at is None or not target:
            skipped += 1
            continue
        search = optimise_span(
            model,
            probe,
            ctx.prompt_ids[i] + ids[:at],
            span,
            target,
            steps=max(steps),
            candidates=candidates,
            top_k=top_k,
            lam=lam,
            seed=seed,
            allowed=allowed,
        )
        for s in steps:
            snap = search.trace[s]
            snapshots[s].append(snap)
            meta = {
                "steps": s,
                "candidates": candidates,
                "top_k": top_k,
                "lam": lam,
                "evaluations": s * candidates,
                "wall_time_s": round(snap.wall_s, 3),
                "loss": snap.loss,
                "nll": snap.nll,
                "probe_logit": snap.probe_logit,
                "init": init,
                "p": position,
                "p_eff": at,
                "m": len(span),
                "target_tokens": len(target),
                "refusal_source": kind,
                "span": tok.decode(snap.span_ids),
                "response_source": ctx.responses[i].source,
            }
            cases.append(AttackCase(i, {"steps": s}, ids[:at] + list(snap.span_ids), meta))
    if skipped:
        logger.warning("skipped %d prompts (position past the refusal or no target)", skipped)
    ctx.config.params["skipped_prompts"] = skipped
    ctx.config.params["budget_curve"] = [
        _budget_point(s, snaps, candidates) for s, snaps in snapshots.items()
    ]
    return cases


def _budget_point(steps: int, snaps: list[SpanStep], candidates: int) -> dict[str, Any]:
    """Mean attacker-side figures of one budget (what the summary JSON records)."""

    def mean(name: str) -> float | None:
        return float(np.mean([getattr(s, name) for s in snaps])) if snaps else None

    return {
        "steps": steps,
        "evaluations": steps * candidates,
        "n": len(snaps),
        "mean_wall_time_s": mean("wall_s"),
        "mean_loss": mean("loss"),
        "mean_nll": mean("nll"),
        "mean_probe_logit": mean("probe_logit"),
    }


def plot_probe_aware(cells: Sequence[CellSummary], path: Path, title: str) -> Path:
    """ASR (and the guard's trigger rate, when guarded) against the attacker's steps."""
    cells = sorted(cells, key=lambda c: c.cell["steps"])
    x = [c.cell["steps"] for c in cells]
    asr = Curve(
        x, [c.asr.rate for c in cells], [c.asr.low for c in cells], [c.asr.high for c in cells]
    )
    curves = {"ASR": asr}
    if all(c.trigger_rate is not None for c in cells):
        rates = [c.trigger_rate for c in cells]
        curves["guard trigger rate"] = Curve(
            x, [r.rate for r in rates], [r.low for r in rates], [r.high for r in rates]
        )
    return plot_curves(
        path,
        curves,
        xlabel="attacker steps (each: 1 gradient + `candidates` forward passes)",
        ylabel="rate (95 % CI)",
        title=title,
        ylim=(0.0, 1.0),
    )


def run_probe_aware(
    config: AttackConfig,
    probe: str | Path | None = None,
    steps: Sequence[int] = DEFAULT_STEPS,
    candidates: int = DEFAULT_CANDIDATES,
    *,
    progress: bool = True,
    **options: Any,
) -> AttackReport:
    """Run the probe-aware attack for every budget in ``steps``.

    ``probe`` is the attacker's probe (default: ``config.probe``, the guard's);
    ``config.probe`` alone decides whether decoding is guarded, so the attack can be run
    unguarded or against another (e.g. retrained) guard probe. ``options`` go to
    :func:`probe_aware_cases` (``top_k``, ``lam``, ``length``, ...).

    Raises:
        ValueError: No probe for the attacker.
    """
    attacker = probe if probe is not None else config.probe
    if attacker is None:
        raise ValueError("the probe-aware attack needs the attacker's probe directory")
    config.params = {
        **config.params,
        "attacker_probe": str(attacker),
        "steps": list(steps),
        "candidates": candidates,
        **options,
    }
    probe_ = LinearProbe.load(attacker)
    build = partial(probe_aware_cases, probe=probe_, steps=steps, candidates=candidates, **options)
    return run_attack(
        config, build, group_by=[("steps",)], plot=plot_probe_aware, progress=progress
    )
