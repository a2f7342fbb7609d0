"""Learning dynamics of shallow alignment.

Modules (imported directly; this package imports nothing eagerly):

* :mod:`~training.dynamics.kl`: per-position KL(aligned || base) on harmful responses.
* :mod:`~training.dynamics.positional`: SFT callback recording per-position loss / grad norm.
* :mod:`~training.dynamics.consistency`: likelihood-based autoregressive consistency curves.
* :mod:`~training.dynamics.teacher`: batched teacher forcing helpers.

Figures are drawn with :mod:`training.common.plots`.
"""
