"""Attention over packed, paged sequences, each with its own prefix adapter (or none).

A step of the engine packs the new tokens of many sequences into one row: sequence s owns the packed
tokens q_start[s] : q_end[s], at positions context[s] .. context[s] + n_s - 1 of that sequence, where
context[s] tokens are already in the paged KV cache. Its queries attend to

    its prefix keys (all of them, when its adapter is a prefix adapter), then its cached keys and its new
    keys up to its own position (causal), within the sliding window when the layer has one.

    paged_attention(query, k_cache, v_cache, batch, scale, prefixes=None, sliding_window=None) -> out

query: [T, H, D] (the step's packed queries); k_cache, v_cache: one layer's flat slots [slots, Hkv, D],
the step's new keys already written; batch: PackedBatch (read_slots[s] are the slots of positions
0 .. context[s] + n_s - 1 of sequence s); prefixes: each sequence's (key, value) [P_s, Hkv, D] or None,
padded by `pad_prefixes`. Grouped-query heads: query head h reads key head h // (H / Hkv). Returns [T, H, D].

This is the torch backend: the sequences padded to the longest (keys gathered from their slots) and one
batched matmul pair, in the query's dtype (float64 included, for the exactness tests). The reference is
`paged_attention_reference`, which attends query by query over each sequence's dense keys.
"""

from dataclasses import dataclass, field

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
    _layout: tuple | None = field(default=None, repr=False, compare=False)  # paged_attention's padding

    @property
    def num_seqs(self) -> int:
        return len(self.context)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _layout(batch: PackedBatch, device) -> tuple:
    """The step's sequences padded to one shape, computed once per step (every layer shares it):
    (read_table [S, L] slots, q_index [S, n] packed rows (T: padding), query_ok [S, n], key_ok [S, n, L],
    distance [S, n, L]: query position minus key position)."""
    if batch._layout is None:
        S = batch.num_seqs
        n = [batch.q_starts[s + 1] - batch.q_starts[s] for s in range(S)]
        L = max(r.numel() for r in batch.read_slots)
        read = torch.zeros(S, L, dtype=torch.int64, device=device)
        for s, slots in enumerate(batch.read_slots):
            read[s, : slots.numel()] = slots
        ctx = torch.tensor(batch.context, device=device)[:, None, None]
        lens = torch.tensor([r.numel() for r in batch.read_slots], device=device)[:, None, None]
        i = torch.arange(max(n), device=device)[None, :, None]
        j = torch.arange(L, device=device)[None, None, :]
        query_ok = i[..., 0] < torch.tensor(n, device=device)[:, None]
        q_index = torch.where(query_ok, torch.tensor(batch.q_starts[:-1], device=device)[:, None] + i[..., 0],
                              batch.num_tokens)  # fmt: skip
        distance = ctx + i - j
        key_ok = (distance >= 0) & (j < lens)
        batch._layout = (read, q_index, query_ok, key_ok, distance)
    return batch._layout


def paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    batch: PackedBatch,
    scale: float,
    prefixes: tuple | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    """Attention of the packed queries over each sequence's prefix and paged keys (module docstring).

    prefixes: None, or (key, value) [S, P, Hkv, D] and lengths [S] (padded; length 0: no prefix), as
    `pad_prefixes` builds them. All sequences run as one batched matmul pair, padded to the longest."""
    read, q_index, query_ok, key_ok, distance = _layout(batch, query.device)
    if sliding_window:
        key_ok = key_ok & (distance < sliding_window)  # transformers' sliding-window overlay
    k, v = k_cache[read], v_cache[read]  # [S, L, Hkv, D]
    if prefixes is not None:
        pk, pv, plen = prefixes
        prefix_ok = torch.arange(pk.shape[1], device=query.device)[None, None, :] < plen[:, None, None]
        k, v = torch.cat([pk.to(k.dtype), k], dim=1), torch.cat([pv.to(v.dtype), v], dim=1)
        key_ok = torch.cat([prefix_ok.expand(-1, key_ok.shape[1], -1), key_ok], dim=2)
    key_ok = key_ok | ~query_ok[..., None]  # padded queries see every key (no empty softmax; discarded)
    S, n = q_index.shape
    Hkv, D = k.shape[2], k.shape[3]
    q = torch.cat([query, query.new_zeros(1, *query.shape[1:])])[q_index]  # [S, n, H, D]
    q = q.view(S, n, Hkv, -1, D)
    scores = torch.einsum("snkgd,slkd->skgnl", q, k) * scale
    scores = scores.masked_fill(~key_ok[:, None, None], float("-inf"))
    half = query.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if half else None).to(v.dtype)
    out = torch.einsum("skgnl,slkd->snkgd", probs, v).reshape(S * n, -1, D)
    return out[query_ok.reshape(-1)]


def pad_prefixes(prefixes: list, like: Tensor) -> tuple | None:
    """Per-sequence prefixes ((key, value) [P_s, Hkv, D] or None) padded for paged_attention, or None."""
    if all(p is None for p in prefixes):
        return None
    P = max(p[0].shape[0] for p in prefixes if p is not None)
    Hkv, D = next(p[0].shape[1:] for p in prefixes if p is not None)
    key = like.new_zeros(len(prefixes), P, Hkv, D)
    value = torch.zeros_like(key)
    lens = torch.zeros(len(prefixes), dtype=torch.int64, device=like.device)
    for s, p in enumerate(prefixes):
        if p is not None:
            key[s, : p[0].shape[0]], value[s, : p[1].shape[0]], lens[s] = p[0], p[1], p[0].shape[0]
    return key, value, lens


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
