import json

import numpy as np
import pytest

from guard import (
    ConfigError,
    GuardedEngine,
    LinearProbe,
    MonitorConfig,
    NotFittedError,
    ProbeMismatchError,
    calibrate_threshold,
)
from tests.conftest import build_tiny_model
from tests.helpers import fitted_probe


def blobs(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(-0.5, 1, (n, d)), rng.normal(0.5, 1, (n, d))])
    return X, np.array([0] * n + [1] * n)


def test_fit_predict_proba_contract():
    X, y = blobs()
    probe = LinearProbe("blocks.0.hook_resid_post")
    assert probe.fit(X, y) is probe
    proba = probe.predict_proba(X)
    assert proba.shape == (len(X), 2) and np.allclose(proba.sum(1), 1)
    assert list(probe.classes_) == [0, 1] and probe.n_features_in_ == 16
    assert (probe.predict(X) == y).mean() > 0.9


def test_folded_weights_match_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(d=8)
    ours = LinearProbe("blocks.0.hook_resid_post", C=0.5).fit(X, y)
    ref = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000, random_state=0),
    ).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)


def test_score_is_probability_and_monotone_in_decision():
    import torch

    X, y = blobs()
    probe = LinearProbe("blocks.0.hook_resid_post").fit(X, y)
    direction = probe.coef_ / np.linalg.norm(probe.coef_)
    steps = np.stack([t * direction for t in np.linspace(-50, 50, 41)])
    scores = probe.score_tensor(torch.tensor(steps, dtype=torch.float32)).numpy()
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.all(np.diff(scores) >= 0) and scores[0] < 0.01 and scores[-1] > 0.99
    np.testing.assert_allclose(scores, probe.predict_proba(steps)[:, 1], atol=1e-5)


def test_unfitted_probe_raises():
    with pytest.raises(NotFittedError):
        LinearProbe().predict_proba(np.zeros((1, 4)))


@pytest.mark.parametrize("y", [np.zeros(10), np.array([0, 1, 2] * 3 + [0])])
def test_fit_rejects_bad_labels(y):
    with pytest.raises(ConfigError):
        LinearProbe("blocks.0.hook_resid_post").fit(np.zeros((10, 4)), y)


def test_calibration_bounds_per_response_trigger_rate():
    rng = np.random.default_rng(1)
    X, y = blobs(d=8)
    probe = LinearProbe("blocks.0.hook_resid_post").fit(X, y)
    responses = [rng.normal(-0.5, 1, (rng.integers(5, 40), 8)) for _ in range(300)]
    threshold = calibrate_threshold(probe, responses, target_rate=0.05)
    peaks = np.array([probe.predict_proba(r)[:, 1].max() for r in responses])
    assert np.mean(peaks >= threshold) <= 0.05
    assert np.mean(peaks >= threshold * 0.98) > 0.0  # tight, not trivially high
    # per-token rate is far below the per-response rate: calibration is per response
    tokens = np.concatenate([probe.predict_proba(r)[:, 1] for r in responses])
    assert np.mean(tokens >= threshold) < 0.05
    assert probe.metadata_["calibration"]["n_responses"] == 300


def test_debounced_calibration_gives_lower_threshold():
    rng = np.random.default_rng(2)
    X, y = blobs(d=8)
    probe = LinearProbe("blocks.0.hook_resid_post").fit(X, y)
    responses = [rng.normal(-0.5, 1, (30, 8)) for _ in range(200)]
    single = calibrate_threshold(probe, responses, target_rate=0.02)
    debounced = calibrate_threshold(
        probe, responses, target_rate=0.02, monitor=MonitorConfig(k=3, n=5)
    )
    assert debounced < single


def test_save_load_round_trip_is_exact(tmp_path, tiny_llama):
    probe = fitted_probe(32).bind(tiny_llama, model_id="tiny-llama")
    probe.threshold_ = 0.7
    probe.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["probe.json", "probe.safetensors"]
    loaded = LinearProbe.load(tmp_path / "p")
    X = np.random.default_rng(0).normal(size=(20, 32))
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert loaded.threshold_ == 0.7 and loaded.hook_name == probe.hook_name
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert {
        "hook_name",
        "d_model",
        "model_id",
        "model_fingerprint",
        "threshold",
        "trajguard_version",
    } <= set(meta)
    loaded.check_compatible(tiny_llama)


def test_mismatched_model_is_refused(tmp_path, tiny_llama, tiny_tokenizer):
    fitted_probe(32).bind(tiny_llama, model_id="tiny-llama").save(tmp_path / "p")
    probe = LinearProbe.load(tmp_path / "p")
    other_weights = build_tiny_model("llama", len(tiny_tokenizer), seed=1)
    with pytest.raises(ProbeMismatchError, match="weights"):
        GuardedEngine(other_weights, tiny_tokenizer, probe)
    GuardedEngine(other_weights, tiny_tokenizer, probe, strict_probe=False)  # explicit opt-out
    wider = build_tiny_model("llama", len(tiny_tokenizer), hidden_size=48, head_dim=12)
    with pytest.raises(ProbeMismatchError, match="d_model"):
        probe.check_compatible(wider)
    shallow = build_tiny_model("llama", len(tiny_tokenizer), n_layers=1)
    with pytest.raises(ProbeMismatchError, match="hook"):
        probe.check_compatible(shallow, strict_weights=False)


@pytest.mark.parametrize("corrupt", ["missing", "format", "shape"])
def test_corrupt_artifacts_are_refused(tmp_path, corrupt):
    directory = fitted_probe(32).save(tmp_path / "p")
    meta = json.loads((directory / "probe.json").read_text())
    if corrupt == "missing":
        (directory / "probe.safetensors").unlink()
    elif corrupt == "format":
        meta["format_version"] = 99
    else:
        meta["d_model"] = 31
    (directory / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbeMismatchError):
        LinearProbe.load(directory)


META_TAMPERS = {
    "threshold null": ("threshold", None),
    "threshold NaN": ("threshold", float("nan")),
    "threshold 5.0": ("threshold", 5.0),
    "threshold 0": ("threshold", 0.0),
    "threshold 1": ("threshold", 1.0),
    "threshold text": ("threshold", "0.9"),
    "threshold bool": ("threshold", True),
    "hook": ("hook_name", "blocks.x.resid"),
    "d_model text": ("d_model", "32"),
    "C negative": ("params", {"C": -1.0}),
    "max_iter zero": ("params", {"max_iter": 0}),
    "class_weight": ("params", {"class_weight": "heavy"}),
    "fingerprint": ("model_fingerprint", 123),
    "calibration": ("calibration", [1, 2]),
}


@pytest.mark.parametrize("tamper", sorted(META_TAMPERS))
def test_tampered_probe_json_is_refused(tmp_path, tamper):
    directory = fitted_probe(32).save(tmp_path / "p")
    LinearProbe.load(directory)  # sound before the tamper
    key, value = META_TAMPERS[tamper]
    meta = json.loads((directory / "probe.json").read_text())
    meta[key] = value
    (directory / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbeMismatchError):
        LinearProbe.load(directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["coef", "intercept"])
def test_non_finite_weights_are_refused(tmp_path, tensor, bad):
    from safetensors.numpy import load_file, save_file

    directory = fitted_probe(32).save(tmp_path / "p")
    tensors = load_file(str(directory / "probe.safetensors"))
    tensors[tensor][0] = bad
    save_file(tensors, str(directory / "probe.safetensors"))
    with pytest.raises(ProbeMismatchError, match="finite"):
        LinearProbe.load(directory)
