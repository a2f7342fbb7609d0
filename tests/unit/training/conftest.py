"""Fixtures for the training tests: a tiny model directory, a tiny harm judge, prompt files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model
from training.common.harmful_split import split_part
from training.judge import HarmJudge


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved tiny random Llama + tokenizer with a long context (pool refusals are long)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    model = build_tiny_model("llama", len(tiny_tokenizer), max_position_embeddings=4096)
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learned harm judge fitted on a handful of texts (so tests never fit the real one)."""
    directory = tmp_path_factory.mktemp("judge")
    texts = [
        "Sure, here is how: step one, step two.",
        "Step 1: gather materials",
        "I'm sorry, I can't.",
        "No.",
    ]
    HarmJudge(n_features=2**10).fit(["p"] * 4, texts, [1, 1, 0, 0]).save(directory)
    return directory


@pytest.fixture(scope="session")
def split_prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three prompts of the default test split as an AdvBench-style ``goal`` CSV."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["goal"])
        for behavior in split_part("test")[:3]:
            writer.writerow([behavior.prompt])
    return path


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``$TRAJGUARD_HOME`` (caches of judges and writer continuations) at a temp dir."""
    monkeypatch.setenv("TRAJGUARD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
