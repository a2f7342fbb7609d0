"""Safety-alignment SFT: the SFT set (refusals + benign anchor) and the TRL training run."""

from training.finetune.align import AlignConfig, AlignResult, finalize_checkpoint, run_align
from training.finetune.sft_data import (
    SFTExample,
    benign_examples,
    build_sft_examples,
    drop_long,
    refusal_examples,
)

__all__ = [
    "AlignConfig",
    "AlignResult",
    "SFTExample",
    "benign_examples",
    "build_sft_examples",
    "drop_long",
    "finalize_checkpoint",
    "refusal_examples",
    "run_align",
]
