"""Offline safety data for trajguard: loaders, typed records, leakage-free splits and pools.

Data is read at run time from ``$TRAJGUARD_DATA`` (default ``<repo>/../shared/data``) and
never copied into the repository.
"""

from training.data.labelled import (
    LABELLED_SOURCES,
    labelled_from_jbb,
    labelled_from_xstest,
    load_labelled_generations,
)
from training.data.loaders import (
    ADVBENCH_TARGET_FIX,
    harmbench_behavior_texts,
    load_advbench_behaviors,
    load_advbench_strings,
    load_derta_pairs,
    load_gsm8k,
    load_harmbench_behaviors,
    load_harmbench_classifier_val,
    load_harmbench_targets,
    load_jbb_artifacts,
    load_jbb_behaviors,
    load_self_instruct,
    load_xstest_completions,
    load_xstest_prompts,
)
from training.data.paths import DATA_ENV_VAR, DataNotFoundError, data_file, resolve_data_dir
from training.data.pools import (
    RECOVERY_TEXTS,
    compose_long_refusal,
    harmful_span_pool,
    refusal_pool,
)
from training.data.prompt_files import PromptFileError, load_prompt_file
from training.data.records import (
    BenignExample,
    HarmfulBehavior,
    HarmfulPair,
    HarmfulSpan,
    JailbreakArtifact,
    LabelledGeneration,
    RefusalText,
    XSTestCompletion,
    XSTestPrompt,
)
from training.data.splits import (
    DEFAULT_THRESHOLD,
    Splits,
    deduplicate,
    group_near_duplicates,
    similar_pairs,
    split_prompts,
)
from training.data.text import normalize_text

__all__ = [
    "ADVBENCH_TARGET_FIX",
    "DATA_ENV_VAR",
    "DEFAULT_THRESHOLD",
    "LABELLED_SOURCES",
    "RECOVERY_TEXTS",
    "BenignExample",
    "DataNotFoundError",
    "HarmfulBehavior",
    "HarmfulPair",
    "HarmfulSpan",
    "JailbreakArtifact",
    "LabelledGeneration",
    "PromptFileError",
    "RefusalText",
    "Splits",
    "XSTestCompletion",
    "XSTestPrompt",
    "compose_long_refusal",
    "data_file",
    "deduplicate",
    "group_near_duplicates",
    "harmbench_behavior_texts",
    "harmful_span_pool",
    "labelled_from_jbb",
    "labelled_from_xstest",
    "load_advbench_behaviors",
    "load_advbench_strings",
    "load_derta_pairs",
    "load_gsm8k",
    "load_harmbench_behaviors",
    "load_harmbench_classifier_val",
    "load_harmbench_targets",
    "load_jbb_artifacts",
    "load_jbb_behaviors",
    "load_labelled_generations",
    "load_prompt_file",
    "load_self_instruct",
    "load_xstest_completions",
    "load_xstest_prompts",
    "normalize_text",
    "refusal_pool",
    "resolve_data_dir",
    "similar_pairs",
    "split_prompts",
]
