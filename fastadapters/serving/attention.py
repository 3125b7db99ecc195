"""Attention over packed, paged sequences, each with its own prefix adapter (or none).

A step of the engine packs the new tokens of many sequences into one row: sequence s owns the packed
tokens q_start[s] : q_end[s], at positions context[s] .. context[s] + n_s - 1 of that sequence, where
context[s] tokens are already in the paged KV cache. Its queries attend to

    its prefix keys (all of them, when its adapter is a prefix adapter), then its cached keys and its new
    keys up to its own position (causal), within the sliding window when the layer has one.

    paged_attention(query, k_cache, v_cache, batch, scale, prefixes=None, sliding_window=None) -> out

query: [T, H, D] (the step's packed queries); k_cache, v_cache: one layer's flat slots [slots, Hkv, D],
the step's new keys already written; batch: PackedBatch (read_slots[s] are the slots of positions
0 .. context[s] + n_s - 1 of sequence s); prefixes[s]: (key, value) [P_s, Hkv, D] or None. Grouped-query
heads: query head h reads key head h // (H / Hkv). Returns [T, H, D].

This is the torch backend (one matmul pair per sequence, in the query's dtype: float64 included, for the
exactness tests). The reference is `paged_attention_reference`, which builds each sequence's dense keys and
runs plain softmax attention.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """One engine step: the packed tokens of every scheduled sequence (the batch contract).

    input_ids, positions, token_adapters: [T] int64 (token_adapters: the bank index of each token's adapter,
    -1: none); q_starts: [S + 1] host ints, sequence s owns tokens q_starts[s] : q_starts[s + 1]; context:
    [S] host ints, its tokens already cached; seq_adapters: [S] host ints; write_slots: [T] int64, the KV
    slot of each new token; read_slots: S tensors, the slots of each sequence's positions 0 .. context + n - 1
    (its block table, expanded); logits_rows: [R] int64 packed indices whose logits are sampled;
    block_tables: S lists of block ids.
    """

    input_ids: Tensor
    positions: Tensor
    token_adapters: Tensor
    q_starts: list
    context: list
    seq_adapters: list
    write_slots: Tensor
    read_slots: list
    logits_rows: Tensor
    block_tables: list

    @property
    def num_seqs(self) -> int:
        return len(self.context)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _visible(context: int, n: int, keys: int, prefix_len: int, sliding_window, device) -> Tensor:
    """[n, prefix_len + keys] bool: which keys each of the n new queries sees."""
    qpos = torch.arange(context, context + n, device=device)[:, None]
    kpos = torch.arange(keys, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window:
        mask &= kpos > qpos - sliding_window  # transformers' sliding-window overlay
    return torch.cat([mask.new_ones(n, prefix_len), mask], dim=1)


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """q [n, H, D], k/v [L, Hkv, D], visible [n, L] -> [n, H, D]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(
        scores, dim=-1, dtype=torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else None
    )
    return torch.einsum("hnl,lhd->nhd", probs.to(v.dtype), v)


def paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    batch: PackedBatch,
    scale: float,
    prefixes: list | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention of the packed queries over each sequence's prefix and paged keys (module docstring)."""
    out = torch.empty_like(query)
    for s in range(batch.num_seqs):
        q0, q1 = batch.q_starts[s], batch.q_starts[s + 1]
        slots = batch.read_slots[s]
        k, v = k_cache[slots], v_cache[slots]
        prefix = None if prefixes is None else prefixes[s]
        plen = 0
        if prefix is not None:
            plen = prefix[0].shape[0]
            k, v = torch.cat([prefix[0].to(k.dtype), k]), torch.cat([prefix[1].to(v.dtype), v])
        visible = _visible(batch.context[s], q1 - q0, slots.numel(), plen, sliding_window, query.device)
        out[q0:q1] = _attend(query[q0:q1], k, v, visible, scale)
    return out


def paged_attention_reference(
    query: Tensor,
    keys: list,
    values: list,
    batch: PackedBatch,
    scale: float,
    prefixes: list | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """The same attention from dense per-sequence keys/values ([context + n, Hkv, D] each), in float64:
    the plain math the paged version must equal."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    for s in range(batch.num_seqs):
        q0, q1 = batch.q_starts[s], batch.q_starts[s + 1]
        k, v = keys[s].double(), values[s].double()
        plen = 0
        if prefixes is not None and prefixes[s] is not None:
            plen = prefixes[s][0].shape[0]
            k, v = torch.cat([prefixes[s][0].double(), k]), torch.cat([prefixes[s][1].double(), v])
        group = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        for i in range(q1 - q0):
            pos = batch.context[s] + i
            seen = [
                j
                for j in range(keys[s].shape[0])
                if j <= pos and (not sliding_window or j > pos - sliding_window)
            ]
            idx = torch.tensor(list(range(plen)) + [plen + j for j in seen], dtype=torch.int64)
            w = torch.softmax(torch.einsum("hd,lhd->hl", query[q0 + i].double(), k[idx]) * scale, dim=-1)
            out[q0 + i] = torch.einsum("hl,lhd->hd", w, v[idx])
    return out
