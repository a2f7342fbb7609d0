"""Random-worst-insertion adversarial safety alignment (and Qi et al.'s augmentation baseline).

Per step, every harmful prompt's K random harmful insertions into its refusal are scored
with the current model, and the worst one (least likely to recover) is trained on with
loss on the recovery tokens only (:class:`WorstInsertionTrainer`).
"""

from training.rwi.candidates import Insertion, make_insertion, sample_insertions
from training.rwi.data import HarmfulSource, InsertionGroup, insertion_groups, qi_examples
from training.rwi.run import AugmentedConfig, run_augmented
from training.rwi.trainer import WorstInsertionTrainer
from training.rwi.worst import CRITERIA, insertion_scores, worst_index

__all__ = [
    "CRITERIA",
    "AugmentedConfig",
    "HarmfulSource",
    "Insertion",
    "InsertionGroup",
    "WorstInsertionTrainer",
    "insertion_groups",
    "insertion_scores",
    "make_insertion",
    "qi_examples",
    "run_augmented",
    "sample_insertions",
    "worst_index",
]
