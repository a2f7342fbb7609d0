"""Helpers shared by several training features (attacks, dynamics, finetune, rwi, probes).

Modules (imported directly; this package imports nothing eagerly):

* :mod:`~training.common.harmful_split`: the project's default harmful-prompt split.
* :mod:`~training.common.prompts`: attack prompts from a file or a part of that split.
* :mod:`~training.common.generation`: many requests through a guarded engine.
* :mod:`~training.common.endpoint`: the same through an OpenAI-compatible server.
* :mod:`~training.common.responses`: a harmful response per prompt (recorded or written).
* :mod:`~training.common.benign`: benign prompt sets by role, clean GSM8K answers.
* :mod:`~training.common.insertion`: insertion geometry (word starts, positions, spans).
* :mod:`~training.common.candidates`: random insertion candidates.
* :mod:`~training.common.worst`: worst-of-K scoring of insertion candidates.
* :mod:`~training.common.stats`: binomial rates with Wilson intervals.
* :mod:`~training.common.plots`: PNG figures.

Nothing here imports a feature package; features import from here.
"""
