"""The paged KV cache: preallocated blocks, a free list, and one block table per sequence.

    cache = PagedKVCache(num_layers, num_kv_heads, head_dim, block_size=16, num_blocks=..., dtype, device)
    cache.allocate(seq_id, num_tokens)      # blocks for a sequence to hold num_tokens (grows its table)
    cache.slots(seq_id, start, end)         # flat slot indices of positions start..end-1
    cache.free(seq_id)                      # its blocks go back to the free list

Per layer, keys and values live in one tensor each, [num_blocks * block_size, Hkv, D] (flat slots: block b,
offset o is slot b * block_size + o). A sequence's position p is in its block table[p // block_size] at offset
p % block_size. Writing a step's keys touches only that step's slots; no step copies the cache.
"""

import torch
from torch import Tensor


class PagedKVCache:
    """Keys and values of every sequence in fixed-size blocks (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block is handed out first
        self.tables: dict[int, list[int]] = {}

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Whether `seq_id` can grow to hold num_tokens positions with the blocks free now."""
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(num_tokens) - have <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grows seq_id's block table to hold num_tokens positions; raises MemoryError when blocks run out
        (nothing is allocated then)."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise MemoryError(f"KV cache: {need} blocks needed, {len(self._free)} free")
        for _ in range(max(need, 0)):
            table.append(self._free.pop())

    def slots(self, seq_id: int, start: int, end: int) -> Tensor:
        """[end - start] int64: the flat slots of positions start..end-1 of seq_id (allocated)."""
        table = torch.tensor(self.tables[seq_id], dtype=torch.int64)
        pos = torch.arange(start, end, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def free(self, seq_id: int) -> None:
        """Returns seq_id's blocks to the free list (a no-op for an unknown sequence)."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
