"""Serving engine (SPEC §8): paged KV block manager, continuous-batching scheduler, model runner
(paged attention, CUDA graphs), the step loop (`LLMEngine`) and the offline API (`LLM`)."""

from idlm.engine.block_manager import AllocationError, BlockManager, BlockManagerError, SeqBlocks

__all__ = ["AllocationError", "BlockManager", "BlockManagerError", "SeqBlocks"]
