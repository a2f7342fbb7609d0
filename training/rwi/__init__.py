"""Random-worst-insertion adversarial safety alignment (and Qi et al.'s augmentation baseline).

Per step, every harmful prompt's K random harmful insertions into its refusal are scored
with the current model, and the worst one (least likely to recover) is trained on with
loss on the recovery tokens only (:class:`WorstInsertionTrainer`). Candidates and the
worst-of-K scoring live in :mod:`training.common.candidates` and :mod:`training.common.worst`,
shared with the RWI attack and probe.
"""

from training.rwi.data import HarmfulSource, InsertionGroup, insertion_groups, qi_examples
from training.rwi.run import AugmentedConfig, run_augmented
from training.rwi.trainer import WorstInsertionTrainer

__all__ = [
    "AugmentedConfig",
    "HarmfulSource",
    "InsertionGroup",
    "WorstInsertionTrainer",
    "insertion_groups",
    "qi_examples",
    "run_augmented",
]
