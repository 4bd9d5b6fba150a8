"""idlm: train, decode and serve Introspective Diffusion Language Models (I-DLM).

An I-DLM is a causal transformer fine-tuned so that one forward pass verifies its previous drafts
and drafts the next ones (introspective strided decoding), committing 1..N tokens per forward while
keeping the AR output distribution. See SPEC.md for the method and README.md for usage.

`from idlm import LLM, SamplingParams` is the offline API (imported lazily: `import idlm` stays cheap).
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name):
    if name == "LLM":
        from idlm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from idlm.decoding.sampling import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from idlm.engine.llm_engine import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'idlm' has no attribute {name!r}")
