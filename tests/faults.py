"""Fault injection for tests: make one request's engine step raise, as a bug on a rare path would."""

from __future__ import annotations

import contextlib

POISON_SEED = 666  # requests with this seed fail


@contextlib.contextmanager
def poisoned_step(decoder, message: str = "injected"):
    """While active, `decoder.step_inputs` raises ValueError(message) for any batch holding a request
    whose SamplingParams.seed is POISON_SEED (the engine then isolates the culprit)."""
    original = decoder.step_inputs

    def poisoned(states, params, *args, **kwargs):
        if any(p.seed == POISON_SEED for p in params):
            raise ValueError(message)
        return original(states, params, *args, **kwargs)

    decoder.step_inputs = poisoned
    try:
        yield
    finally:
        decoder.step_inputs = original
