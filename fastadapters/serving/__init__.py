"""Serving: the continuous-batching engine over an AdapterBank, its paged KV cache and packed attention.

Above the layers (bank, patch) and below the CLI. See engine.py for the engine, attention.py for the batch
contract (PackedBatch) and the paged attention, kv_cache.py for the cache, pool.py for the adapter pool.
"""

from fastadapters.serving.attention import (
    PackedBatch,
    pad_prefixes,
    paged_attention,
    paged_attention_reference,
)
from fastadapters.serving.engine import Engine, RequestHandle, SamplingParams
from fastadapters.serving.kv_cache import PagedKVCache
from fastadapters.serving.pool import AdapterPool

__all__ = [
    "AdapterPool",
    "Engine",
    "RequestHandle",
    "SamplingParams",
    "PackedBatch",
    "PagedKVCache",
    "paged_attention",
    "paged_attention_reference",
    "pad_prefixes",
]
