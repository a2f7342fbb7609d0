"""Judges of model outputs: keyword refusal judge, learned and keyword harm judges, LLM judge."""

from training.judge.attack_judge import attack_judge_key, fit_attack_judge
from training.judge.evaluate import (
    EvaluationReport,
    HeldOutEvaluation,
    JudgeScores,
    evaluate_attack_judge,
    evaluate_harm_judges,
    evaluate_refusal_judges,
    run_evaluation,
    score,
)
from training.judge.exclusion import (
    RecordSelection,
    evaluation_prompts,
    paraphrase_similarity,
    select_records,
)
from training.judge.harm import HarmJudge, HarmScorer, KeywordHarmJudge, two_column_proba
from training.judge.llm import (
    LLMHarmJudge,
    LLMJudgeError,
    harmbench_messages,
    harmbench_prompt,
    parse_verdict,
)
from training.judge.refusal import GCG_TEST_PREFIXES, REFUSAL_PHRASES, is_refusal
from training.judge.selection import C_GRID, CSelection, fit_selected, select_C

__all__ = [
    "C_GRID",
    "GCG_TEST_PREFIXES",
    "REFUSAL_PHRASES",
    "CSelection",
    "EvaluationReport",
    "HarmJudge",
    "HarmScorer",
    "HeldOutEvaluation",
    "JudgeScores",
    "KeywordHarmJudge",
    "LLMHarmJudge",
    "LLMJudgeError",
    "RecordSelection",
    "attack_judge_key",
    "evaluate_attack_judge",
    "evaluate_harm_judges",
    "evaluate_refusal_judges",
    "evaluation_prompts",
    "fit_attack_judge",
    "fit_selected",
    "harmbench_messages",
    "harmbench_prompt",
    "is_refusal",
    "paraphrase_similarity",
    "parse_verdict",
    "run_evaluation",
    "score",
    "select_C",
    "select_records",
    "two_column_proba",
]
