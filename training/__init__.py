"""Training-side tooling for trajguard: data, judges, attacks, dynamics, safety SFT, RWI, probes.

Sub-packages import one way, bottom to top: ``data`` -> ``judge`` -> ``common`` (helpers
several features share) -> ``attacks``, ``dynamics``, ``finetune`` (which records
``dynamics``' per-position SFT callback) -> ``rwi`` (uses ``finetune``) -> ``probes``
(uses ``attacks`` and ``rwi``) -> :mod:`training.cli`, the ``trajguard train`` app.
"""
