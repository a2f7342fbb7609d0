"""Attacks on (optionally guarded) models: direct, prefilling, RAP, insertion, multi-turn, evasion."""

from training.attacks.direct import run_direct
from training.attacks.evasion import FORMS, run_evasion
from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    CellSummary,
    build_engine,
    run_attack,
    summarize,
)
from training.attacks.insert import DEFAULT_LENGTHS, DEFAULT_POSITIONS, run_insert
from training.attacks.judging import Verdict, judge_outputs, load_or_fit_judge
from training.attacks.multiturn import VARIANTS, run_multiturn
from training.attacks.prefill import DEFAULT_KS, run_prefill
from training.attacks.probe_aware import optimise_span, run_probe_aware
from training.attacks.rap import DEFAULT_RAP_KS, RapPrefix, rap_prefix, run_rap

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_LENGTHS",
    "DEFAULT_POSITIONS",
    "DEFAULT_RAP_KS",
    "FORMS",
    "VARIANTS",
    "AttackCase",
    "AttackConfig",
    "AttackContext",
    "AttackReport",
    "CellSummary",
    "RapPrefix",
    "Verdict",
    "build_engine",
    "judge_outputs",
    "load_or_fit_judge",
    "optimise_span",
    "run_attack",
    "run_direct",
    "run_evasion",
    "run_insert",
    "run_multiturn",
    "rap_prefix",
    "run_prefill",
    "run_probe_aware",
    "run_rap",
    "summarize",
]
