"""KV block ownership: the pool's free list and ref counts, and per-sequence block tables."""

from kvcache.block_pool import BlockPool, IntegrityError, OutOfBlocksError
from kvcache.sequence_blocks import SequenceBlocks

__all__ = ["BlockPool", "IntegrityError", "OutOfBlocksError", "SequenceBlocks"]
