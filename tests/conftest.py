"""Shared fixtures. The real model is loaded once per session (slow tests)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, eval mode, offline."""
    from dynamics.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` or skip the test when it is absent."""
    from dynamics.data import shared_data_dir
    path = shared_data_dir(ROOT)
    if path is None:
        pytest.skip("../shared/data is absent")
    return path
