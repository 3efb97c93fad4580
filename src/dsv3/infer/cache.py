"""Paged latent cache: a pool of fixed-size blocks per layer, block tables per sequence, a free list.

Each layer's pool holds rows [norm(c_kv) | rotated k_pe] (kv_lora_rank + qk_rope_head_dim values) for
`block_size` tokens per block; a sequence's position p lives in row table[p // block_size] * block_size +
p % block_size of every layer's pool (main layers, then the MTP module's own layer when drafting). Blocks are
reference-counted so the n choices of one prompt share its full prompt blocks.

One extra "scratch" block after the last usable one absorbs the writes of padding tokens and is what
padding slots read (masked out), so batches of different lengths need no special cases in the model.

A forward pass sees the pool through a `PagedView`, which looks like a `LatentCache` to
`DeepseekV3.forward_cached` / `prefill`: `view.latent[i]` is a `PagedLayer` whose `update(new)` stores the
new rows in their slots and returns the first L positions of each sequence, [B, L, rank + rope]: a view
of the pool when one sequence's blocks are contiguous (no copy), else a gather.
"""

from __future__ import annotations

import heapq

import torch


class CacheFull(RuntimeError):
    """Not enough free blocks (the engine checks before allocating, so this signals a bookkeeping bug)."""


class PagedLayer:
    """One layer's pool as one forward pass sees it: where to write the new rows and what to read."""

    __slots__ = ("pool", "slots", "read", "dtype")

    def __init__(self, pool: torch.Tensor, slots: torch.Tensor | None, read: torch.Tensor | slice | None):
        self.pool, self.slots, self.read, self.dtype = pool, slots, read, pool.dtype

    def write(self, new: torch.Tensor) -> None:
        """new [B, S, D] -> rows `slots` [B, S] of the pool (padding tokens go to the scratch block)."""
        self.pool.index_copy_(0, self.slots.view(-1), new.reshape(-1, new.shape[-1]).to(self.dtype))

    def update(self, new: torch.Tensor) -> torch.Tensor:
        self.write(new)
        if isinstance(self.read, slice):
            return self.pool[self.read].unsqueeze(0)  # [1, L, D], no copy
        return self.pool[self.read]  # [B, L, D] gathered


class PagedView:
    """What one forward pass needs of the cache: .latent[i] per layer (PagedLayer) and .absorbed."""

    def __init__(self, cache: "PagedLatentCache", slots: torch.Tensor | None, read: torch.Tensor | slice | None,
                 mtp_slots: torch.Tensor | None = None):
        n = cache.num_main_layers
        self.absorbed = cache.absorbed
        self.latent = [PagedLayer(pool, slots if i < n else mtp_slots, read) for i, pool in enumerate(cache.pools)]


class PagedLatentCache:
    def __init__(self, model, num_blocks: int, block_size: int = 16, mtp_layers: int = 0,
                 dtype: torch.dtype | None = None):
        cfg = model.config
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if mtp_layers > cfg.num_nextn_predict_layers:
            raise ValueError(f"mtp_layers={mtp_layers} but the model has {cfg.num_nextn_predict_layers} MTP modules")
        self.device = model.device
        # fp32 on CPU for the same reasons as DeepseekV3.new_cache (faster small bmm, exact values)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else model.dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_main_layers = cfg.num_hidden_layers
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        layers = model.layers + model.mtp[:mtp_layers]
        rows = (num_blocks + 1) * block_size  # + the scratch block
        self.pools = [torch.zeros(rows, self.width, dtype=self.dtype, device=self.device) for _ in layers]
        with torch.no_grad():
            self.absorbed = [layer.self_attn.absorbed_weights(self.dtype) for layer in layers]
        self.scratch = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a heap: the lowest free block first keeps sequences contiguous

    # ---- blocks ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFull(f"asked for {n} cache blocks, {len(self._free)} free")
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> list[int]:
        """Another reference to `blocks` (read-only sharing: no one writes into a shared block)."""
        for b in blocks:
            self.refs[b] += 1
        return list(blocks)

    def copy(self, src: int) -> int:
        """A new block holding a copy of block `src` (every layer)."""
        (dst,) = self.allocate(1)
        bs = self.block_size
        for pool in self.pools:
            pool[dst * bs:(dst + 1) * bs] = pool[src * bs:(src + 1) * bs]
        return dst

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                heapq.heappush(self._free, b)
            elif self.refs[b] < 0:
                raise RuntimeError(f"cache block {b} released more often than allocated")

    # ---- views ----------------------------------------------------------------------------------------
    def slots(self, table: list[int], positions) -> list[int]:
        """Pool rows of `positions` in a sequence with block table `table`."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def scratch_slot(self) -> int:
        return self.scratch * self.block_size

    def read_index(self, tables: list[list[int]], length: int) -> torch.Tensor | slice:
        """What `PagedLayer.update` reads: positions 0..length-1 of each sequence. A slice of the pool (no
        copy) for one sequence whose blocks are consecutive, else a [B, length] row index (padding blocks
        -> the scratch block, which the mask hides)."""
        bs = self.block_size
        nb = self.blocks_for(length)
        if len(tables) == 1:
            t = tables[0]
            if t[nb - 1] - t[0] == nb - 1 and all(t[i + 1] == t[i] + 1 for i in range(nb - 1)):
                return slice(t[0] * bs, t[0] * bs + length)
        padded = [t[:nb] + [self.scratch] * (nb - len(t[:nb])) for t in tables]
        table = torch.tensor(padded, dtype=torch.long)  # [B, nb]
        rows = (table[:, :, None] * bs + torch.arange(bs)).view(len(tables), nb * bs)[:, :length]
        return rows.to(self.device)

    def view(self, slots: list[list[int]] | None, read: torch.Tensor | slice | None = None,
             mtp_slots: list[list[int]] | None = None) -> PagedView:
        """A view writing new rows to `slots` [B][S] (main layers) / `mtp_slots` (MTP layers; the same list
        object as `slots` shares its tensor)."""
        def t(s):
            return None if s is None else torch.tensor(s, dtype=torch.long, device=self.device)

        main = t(slots)
        return PagedView(self, main, read, main if mtp_slots is slots else t(mtp_slots))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)
