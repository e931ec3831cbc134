"""Shared fixtures. Everything here runs offline: the hub is never asked."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "agg")


@pytest.fixture(scope="session")
def base_model():
    """The real base model (embedded SmolLM2-135M-Instruct offline), float32 on the CPU.

    Shared by the whole session: tests must not change it, or must undo what they change.
    """
    from course.models import load_base_model

    return load_base_model(device="cpu", dtype=__import__("torch").float32, progress=False)


@pytest.fixture(scope="session")
def tokenizer():
    from course.models import load_tokenizer

    return load_tokenizer()
