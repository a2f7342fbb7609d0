"""Linear probe P(unsafe | residual stream), scikit-learn style, saved as safetensors + JSON.

The probe is a standardisation followed by an L2 logistic regression. After ``fit`` both
are folded into one weight vector and bias, so scoring a decoding step is one dot product
(:meth:`LinearProbe.score_tensor`) and a loaded probe scores exactly like the fitted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from guard.arch import num_layers
from guard.errors import ConfigError, NotFittedError, ProbeMismatchError
from guard.hooks import parse_hook_name
from guard.version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WEIGHTS_FILE = "probe.safetensors"
_META_FILE = "probe.json"


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic-regression probe on one hook point; class 1 means *unsafe*.

    Args:
        hook_name: activation it reads, e.g. ``"blocks.-1.hook_resid_post"``.
        C: inverse L2 regularisation strength.
        class_weight: ``"balanced"`` (default) reweights classes by inverse frequency.
        max_iter: solver iterations.
        random_state: solver seed.

    Attributes:
        coef_: ndarray of shape (n_features,), folded weights on raw activations.
        intercept_: float, folded bias.
        classes_: ndarray ``[0, 1]``.
        n_features_in_: activation width (``d_model``).
        threshold_: calibrated P(unsafe) threshold, or ``None`` before calibration.
        metadata_: provenance (model id, fingerprint, calibration and data summaries).
    """

    def __init__(
        self,
        hook_name: str = "blocks.-1.hook_resid_post",
        *,
        C: float = 1.0,
        class_weight: str | dict | None = "balanced",
        max_iter: int = 2000,
        random_state: int | None = 0,
    ) -> None:
        self.hook_name = hook_name
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(
        self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> LinearProbe:
        """Fit on activations ``X`` of shape (n_samples, d_model) and labels ``y`` in {0, 1}.

        ``sample_weight`` (optional, per sample) multiplies the class weights, e.g. to
        up-weight mined hard negatives.

        Raises:
            ConfigError: bad hook name, shapes, or labels other than both of {0, 1}.
        """
        parse_hook_name(self.hook_name)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise ConfigError(
                f"X must be (n_samples, d_model) matching y; got {X.shape} vs {y.shape}"
            )
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ConfigError("y must contain both classes 0 (safe) and 1 (unsafe)")
        scaler = StandardScaler().fit(X)
        logistic = LogisticRegression(
            C=self.C,
            class_weight=self.class_weight,
            max_iter=self.max_iter,
            random_state=self.random_state,
        ).fit(scaler.transform(X), y, sample_weight=sample_weight)
        scale = scaler.scale_
        self.coef_ = logistic.coef_[0] / scale
        self.intercept_ = float(
            logistic.intercept_[0] - np.sum(logistic.coef_[0] * scaler.mean_ / scale)
        )
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.threshold_: float | None = None
        self.metadata_: dict[str, Any] = {"n_train": int(len(y)), "n_unsafe": int(y.sum())}
        self._torch_weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("this LinearProbe is not fitted: call fit() or LinearProbe.load()")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log-odds of *unsafe*, shape (n_samples,)."""
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ConfigError(
                f"expected (n_samples, {self.n_features_in_}) activations, got {X.shape}"
            )
        return X @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n_samples, 2), columns ordered as ``classes_``."""
        p_unsafe = expit(self.decision_function(X))
        return np.stack([1.0 - p_unsafe, p_unsafe], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 where P(unsafe) ≥ the calibrated threshold (0.5 before calibration)."""
        threshold = 0.5 if self.threshold_ is None else self.threshold_
        return (self.predict_proba(X)[:, 1] >= threshold).astype(int)

    def score_tensor(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(unsafe) for a batch of activations on any device, shape [batch].

        Args:
            hidden: ``[batch, d_model]`` residual-stream vectors.
        """
        self._check_fitted()
        key = (hidden.device, hidden.dtype)
        if key not in self._torch_weights:
            # fp32 accumulation even for bf16 models: the probe is tiny.
            weight = torch.as_tensor(self.coef_, dtype=torch.float32, device=hidden.device)
            bias = torch.tensor(self.intercept_, dtype=torch.float32, device=hidden.device)
            self._torch_weights[key] = (weight, bias)
        weight, bias = self._torch_weights[key]
        return torch.sigmoid(hidden.float() @ weight + bias)  # [batch]

    def rescale(self, scale: float, shift: float) -> LinearProbe:
        """Map the log-odds ``z`` to ``scale * z + shift`` in place (Platt scaling, folded).

        Scores stay one dot product; the threshold is dropped (recalibrate after this).
        """
        self._check_fitted()
        if not (np.isfinite(scale) and np.isfinite(shift)) or scale <= 0:
            raise ConfigError(f"rescale needs a finite scale > 0 and shift, got {scale}, {shift}")
        self.coef_ = self.coef_ * scale
        self.intercept_ = float(self.intercept_ * scale + shift)
        self.threshold_ = None
        self._torch_weights = {}
        return self

    def state_digest(self) -> str:
        """Short sha256 of what decides this probe's verdicts: hook, weights, bias, threshold."""
        self._check_fitted()
        h = hashlib.sha256(f"{self.hook_name}|{self.intercept_!r}|{self.threshold_!r}".encode())
        h.update(np.ascontiguousarray(self.coef_, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    # ---- persistence -------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``probe.safetensors`` (weights) and ``probe.json`` (config, provenance)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"coef": self.coef_.astype(np.float64), "intercept": np.array([self.intercept_])},
            str(directory / _WEIGHTS_FILE),
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "trajguard_version": __version__,
            "hook_name": self.hook_name,
            "d_model": int(self.n_features_in_),
            "threshold": self.threshold_,
            "params": {"C": self.C, "class_weight": self.class_weight, "max_iter": self.max_iter},
            **self.metadata_,
        }
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LinearProbe:
        """Load a probe saved by :meth:`save` (never unpickles anything).

        Every recorded field is checked: a probe that would silently never (or always)
        fire is refused rather than loaded.

        Raises:
            ProbeMismatchError: missing files, unknown format, or invalid contents (hook,
                d_model, non-finite weights or intercept, a threshold outside (0, 1) or
                missing, bad training parameters or provenance fields).
        """
        directory = Path(directory)
        meta_path, weights_path = directory / _META_FILE, directory / _WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise ProbeMismatchError(
                f"{directory} is not a probe directory (needs {_META_FILE} and {_WEIGHTS_FILE})"
            )
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights_path))
        except (ValueError, OSError) as exc:
            raise ProbeMismatchError(f"unreadable probe in {directory}: {exc}") from exc
        _check_artefact(directory, meta, tensors)
        params = meta.get("params", {})
        probe = cls(
            meta["hook_name"],
            **{k: params[k] for k in ("C", "class_weight", "max_iter") if k in params},
        )
        probe.coef_ = tensors["coef"].astype(np.float64)
        probe.intercept_ = float(tensors["intercept"][0])
        probe.classes_ = np.array([0, 1])
        probe.n_features_in_ = int(meta["d_model"])
        probe.threshold_ = float(meta["threshold"])
        reserved = {
            "format_version",
            "trajguard_version",
            "hook_name",
            "d_model",
            "threshold",
            "params",
        }
        probe.metadata_ = {k: v for k, v in meta.items() if k not in reserved}
        probe.metadata_["saved_with"] = meta.get("trajguard_version")
        probe._torch_weights = {}
        return probe

    def bind(self, model: torch.nn.Module, *, model_id: str | None = None) -> LinearProbe:
        """Record the model this probe belongs to (id and weight fingerprint) before saving."""
        from guard.models import model_fingerprint

        self._check_fitted()
        self.metadata_["model_id"] = model_id
        self.metadata_["model_fingerprint"] = model_fingerprint(model)
        return self

    def check_compatible(self, model: torch.nn.Module, *, strict_weights: bool = True) -> None:
        """Raise :class:`ProbeMismatchError` unless this probe fits the live ``model``.

        Checks the hook layer exists, the activation width, and (``strict_weights``) that
        the model's weight fingerprint equals the one recorded by :meth:`bind`.
        """
        from guard.models import model_fingerprint

        self._check_fitted()
        n_layers = num_layers(model)
        try:
            parse_hook_name(self.hook_name).resolve(n_layers)
        except ConfigError as exc:
            raise ProbeMismatchError(
                f"probe hook {self.hook_name!r} does not fit the model: {exc}"
            ) from exc
        d_model = int(model.config.hidden_size)
        if d_model != self.n_features_in_:
            raise ProbeMismatchError(
                f"probe expects d_model={self.n_features_in_}, model has {d_model}"
            )
        expected = self.metadata_.get("model_fingerprint")
        if strict_weights and expected is not None and expected != model_fingerprint(model):
            raise ProbeMismatchError(
                f"probe was fitted on model {self.metadata_.get('model_id')!r} with weights {expected}; "
                f"the live model's weights differ ({model_fingerprint(model)}). Refit the probe or pass "
                "strict_weights=False if the difference is intended."
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_artefact(directory: Path, meta: Any, tensors: dict[str, np.ndarray]) -> None:
    """Raise :class:`ProbeMismatchError` unless ``probe.json`` and the weights are sound."""

    def bad(what: str) -> ProbeMismatchError:
        return ProbeMismatchError(f"invalid probe in {directory}: {what}")

    if not isinstance(meta, dict):
        raise bad(f"{_META_FILE} must hold a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ProbeMismatchError(
            f"probe format {meta.get('format_version')!r} in {directory}; "
            f"this trajguard reads {FORMAT_VERSION}"
        )
    try:
        parse_hook_name(meta.get("hook_name"))
    except (ConfigError, TypeError, AttributeError) as exc:
        raise bad(f"hook_name {meta.get('hook_name')!r}: {exc}") from exc
    d_model = meta.get("d_model")
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
        raise bad(f"d_model must be a positive integer, got {d_model!r}")
    coef, intercept = tensors.get("coef"), tensors.get("intercept")
    if coef is None or coef.ndim != 1 or coef.shape[0] != d_model:
        raise ProbeMismatchError(f"probe weights in {directory} do not match d_model={d_model}")
    if intercept is None or intercept.shape != (1,):
        raise bad("the intercept must be one number")
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        raise bad("weights and intercept must be finite (no NaN or inf)")
    threshold = meta.get("threshold")
    if threshold is None:
        raise bad("no calibrated threshold (calibrate_threshold before saving)")
    if not _is_number(threshold) or not 0.0 < threshold < 1.0:
        raise bad(f"threshold must be a number in (0, 1), got {threshold!r}")
    params = meta.get("params", {})
    if not isinstance(params, dict):
        raise bad("params must be an object")
    if "C" in params and not (_is_number(params["C"]) and params["C"] > 0):
        raise bad(f"params.C must be a positive number, got {params['C']!r}")
    if "max_iter" in params and not (
        isinstance(params["max_iter"], int) and params["max_iter"] > 0
    ):
        raise bad(f"params.max_iter must be a positive integer, got {params['max_iter']!r}")
    if "class_weight" in params and not (
        params["class_weight"] in (None, "balanced") or isinstance(params["class_weight"], dict)
    ):
        raise bad("params.class_weight must be null, 'balanced' or an object")
    for key in ("model_id", "model_fingerprint"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"{key} must be a string")
    if "calibration" in meta and not isinstance(meta["calibration"], dict):
        raise bad("calibration must be an object")


def allowed_false_triggers(n: int, max_upper_bound: float, confidence: float = 0.95) -> int:
    """Most triggers ``x`` among ``n`` benign responses whose one-sided Clopper-Pearson upper
    bound on the trigger rate is at most ``max_upper_bound``; -1 when even ``x = 0`` is not
    (too few responses: ``n`` must be at least ``log(1 - confidence) / log(1 - bound)``,
    299 for a 1 % bound at 95 %)."""
    from scipy.stats import beta

    allowed = -1
    for x in range(n):
        if beta.ppf(confidence, x + 1, n - x) > max_upper_bound:
            break
        allowed = x
    return allowed


def calibrate_threshold(
    probe: LinearProbe,
    benign_responses: Sequence[np.ndarray],
    *,
    target_rate: float = 0.01,
    monitor: Any = None,
    confidence: float | None = None,
) -> float:
    """Set ``probe.threshold_`` so at most ``target_rate`` of benign *responses* trigger.

    The monitor fires anywhere in a response, so the relevant statistic is each
    response's peak debounced score, not the per-token score.

    Args:
        probe: fitted probe; updated in place (threshold and calibration stats).
        benign_responses: one ``(n_tokens, d_model)`` array of activations per response.
        target_rate: allowed per-response false-trigger rate.
        monitor: a :class:`guard.config.MonitorConfig` whose debounce is applied; default
            fires on a single hot step.
        confidence: ``None``: the point rate on these responses is at most ``target_rate``.
            Else the one-sided ``confidence`` upper bound of that rate is (see
            :func:`allowed_false_triggers`): fewer triggers allowed, a defensible claim.

    Returns:
        The threshold.

    Raises:
        ConfigError: no responses, or too few for the bound at ``confidence``.
    """
    from guard.config import MonitorConfig
    from guard.monitor import peak_debounced_score

    if not 0.0 <= target_rate < 1.0:
        raise ConfigError("target_rate must be in [0, 1)")
    responses = [r for r in benign_responses if len(r)]
    if not responses:
        raise ConfigError("calibration needs at least one non-empty benign response")
    config = monitor or MonitorConfig()
    peaks = np.array(
        [peak_debounced_score(probe.predict_proba(r)[:, 1], config) for r in responses]
    )
    if confidence is None:
        allowed = int(np.floor(target_rate * len(peaks)))
    else:
        allowed = allowed_false_triggers(len(peaks), target_rate, confidence)
        if allowed < 0:
            raise ConfigError(
                f"{len(peaks)} calibration responses cannot bound the false-trigger rate at "
                f"{target_rate} with {confidence:.0%} confidence; give more"
            )
    # Smallest threshold with at most ``allowed`` peaks at or above it.
    ordered = np.sort(peaks)[::-1]
    threshold = (
        float(np.nextafter(ordered[allowed], 1.0)) if allowed < len(ordered) else float(ordered[-1])
    )
    threshold = min(max(threshold, 1e-6), 1 - 1e-6)
    probe.threshold_ = threshold
    probe.metadata_["calibration"] = {
        "target_response_rate": target_rate,
        "rule": "point" if confidence is None else f"upper_bound@{confidence}",
        "achieved_response_rate": float(np.mean(peaks >= threshold)),
        "n_responses": len(peaks),
        "n_tokens": int(sum(len(r) for r in responses)),
        "peak_quantiles": {q: float(np.quantile(peaks, float(q))) for q in ("0.5", "0.9", "0.99")},
        "debounce": config.rule,
    }
    return threshold
