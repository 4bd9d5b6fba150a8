"""Serving engine (SPEC §8): paged KV page manager, continuous-batching scheduler, model runner
(paged attention, CUDA graphs), the step loop (`LLMEngine`), its options (`config.py`) and the offline API (`LLM`).

Exported here: `LLMEngine`, `EngineConfig` and `LLM` (imported lazily, so `idlm.engine.options` stays
importable without torch), and the page manager's `PageManager` (old name `BlockManager`), `SeqBlocks` and
its errors.
"""

from idlm.engine.block_manager import (
    AllocationError,
    BlockManager,
    BlockManagerError,
    PageManager,
    PageManagerError,
    SeqBlocks,
)

__all__ = ["LLM", "LLMEngine", "EngineConfig", "AllocationError", "PageManager", "PageManagerError", "BlockManager",
           "BlockManagerError", "SeqBlocks"]


def __getattr__(name):
    if name == "LLM":
        from idlm.engine.llm import LLM

        return LLM
    if name == "EngineConfig":
        from idlm.engine.config import EngineConfig

        return EngineConfig
    if name == "LLMEngine":
        from idlm.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'idlm.engine' has no attribute {name!r}")
