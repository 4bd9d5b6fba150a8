"""Serving engine: paged KV bookkeeping and scheduling for AR and diffusion decoding (SPEC §8)."""

from idlm.engine.block_manager import AllocationError, BlockManager, BlockManagerError, SeqBlocks

__all__ = ["AllocationError", "BlockManager", "BlockManagerError", "SeqBlocks"]
