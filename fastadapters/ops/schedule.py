"""The multi-adapter schedule and bank layout, shared by multi_lora_linear and multi_bottleneck_adapter.

Bank layout (no padding to the largest rank: an adapter of rank r costs r rows, and tokens cost work in
proportion to their own adapter's rank):
    ranks = [r_0, …, r_{n-1}] (r_a >= 0; 0 = adapter a has nothing on this layer), off_a = r_0 + … + r_{a-1}
    bank_a [Σ r_a, d_in]:  rows off_a : off_a + r_a hold A_a   (the adapters' A stacked along the rank)
    bank_b [Σ r_a, d_out]: the same rows hold B_aᵀ              (B transposed, so each slice is contiguous)
The grouped form (q/k/v or gate/up: members m that read the same x) reads x once for one shrink:
    bank_a [Σ_a Σ_m r_{m,a}, d_in]: adapter a's rows form one block holding A_{0,a}, A_{1,a}, … stacked;
    bank_bs[m] [Σ_a r_{m,a}, d_out_m]: member m's B_{m,a}ᵀ in adapter order, as in the single form.
`host_meta(ranks, k)` gives the offsets of that layout; the ops pass it to their backends (kernels import
nothing from here).

Tokens are never physically regrouped by the kernels: an `AdapterSchedule` (built once per batch by
`adapter_schedule` and shared by every layer) holds the token indices sorted by adapter and each adapter's
segment in that list. When the ids are already sorted (AdapterBank sorts the rows of a batch by adapter),
segments are contiguous token ranges and the torch backend works on views with no gather at all.
"""

import functools
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._dispatch import ENV_VAR, IMPLEMENTATIONS, Backend, select

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# The ops whose backends prepare data from a schedule (registered by multi_lora.py, multi_bottleneck.py).
SCHEDULED_OPS = ("multi_lora_linear", "multi_bottleneck_adapter")


@dataclass(frozen=True)
class AdapterSchedule:
    """The tokens of a batch sorted by adapter, computed once and shared by every layer's op call.

    adapter_ids: [N] int64; order: [N] int64 token indices sorted by adapter id (stable), or empty when the
    ids are already sorted; starts: [num_adapters + 1] int64, adapter a's tokens are
    order[starts[a] : starts[a + 1]] (tokens with id −1 come before starts[0]).
    """

    adapter_ids: Tensor
    order: Tensor
    starts: Tensor
    num_adapters: int
    # Tokens per row when the ids came as rows ([..., L]) with one id per row (AdapterBank's batches), else 0.
    row_len: int = 0
    # Backend data derived from the schedule (e.g. Triton's tile table), filled on first use.
    prepared: dict = field(default_factory=dict, compare=False, repr=False)
    # The backend chosen per (op, dtype, FASTADAPTERS_BACKEND), so a batch's layers dispatch once.
    backends: dict = field(default_factory=dict, compare=False, repr=False)

    def backend(self, op: str, dtype: torch.dtype) -> Backend:
        """The backend `select` picks for `op` on this schedule's device and `dtype`, chosen once per
        schedule (every layer of a batch shares it; FASTADAPTERS_BACKEND is part of the key)."""
        key = (op, dtype, os.environ.get(ENV_VAR))
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = select(op, self.device, dtype=dtype)
        return backend

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.adapter_ids.device


def adapter_schedule(adapter_ids: Tensor, num_adapters: int) -> AdapterSchedule:
    """Sorts the tokens by adapter once, for every multi_lora_linear call of a batch.

    adapter_ids: integer tensor of any shape (flattened to the tokens, as x.shape[:-1] is), values in
    [−1, num_adapters). On CPU tensors the values are checked; on a GPU (no host sync) ids outside that
    range belong to no adapter's segment and get the base output only.
    """
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in INT_DTYPES:
        raise TypeError(f"adapter_ids must be an integer tensor, got {C.describe(adapter_ids)}")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 0:
        raise ValueError(f"num_adapters must be an int >= 0, got {num_adapters!r}")
    ids = adapter_ids.reshape(-1).to(torch.int64).contiguous()
    is_sorted, row_len = False, 0
    if ids.device.type == "cpu" and ids.numel() > 0 and adapter_ids.dim() >= 2 and adapter_ids.shape[-1] > 1:
        rows = ids.view(-1, adapter_ids.shape[-1])
        row_len = adapter_ids.shape[-1] if bool((rows == rows[:, :1]).all()) else 0
    if ids.device.type == "cpu" and ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"adapter_ids must be in [-1, {num_adapters}) (-1 = no adapter, {num_adapters} adapters in "
                f"the bank), got values in [{lo}, {hi}] ({C.describe(adapter_ids)})"
            )
        is_sorted = ids.numel() == 1 or bool((ids[1:] >= ids[:-1]).all())
    if is_sorted or ids.numel() == 0:
        order, sorted_ids = ids.new_empty(0), ids
    else:
        sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.searchsorted(
        sorted_ids, torch.arange(num_adapters + 1, device=ids.device, dtype=torch.int64)
    )
    schedule = AdapterSchedule(ids, order, starts, num_adapters, row_len)
    # Prepare now, outside any compiled region, for the backends the ops will pick on this device (the
    # preparation reads the schedule's values, which a torch.compile graph cannot do without a break).
    for op in SCHEDULED_OPS:
        if op not in IMPLEMENTATIONS:
            continue
        try:
            prepared(schedule, select(op, schedule.device))
        except RuntimeError:  # no backend here: the op call itself raises with the reasons
            pass
    return schedule


def prepared(schedule: AdapterSchedule, backend: Backend) -> Tensor:
    """The backend's data for this schedule (e.g. Triton's tile table), computed once per backend."""
    tiles = schedule.prepared.get(backend.name)
    if tiles is None:
        tiles = schedule.prepared[backend.name] = backend.module().prepare(schedule)
    return tiles


def check_schedule(adapter_ids, x: Tensor, n: int) -> AdapterSchedule:
    """adapter_ids (a tensor of x.shape[:-1] or an AdapterSchedule) as a schedule for n adapters on x."""
    lead = tuple(x.shape[:-1])
    if isinstance(adapter_ids, AdapterSchedule):
        sched = adapter_ids
        if sched.num_adapters != n:
            raise ValueError(f"adapter_ids is a schedule for {sched.num_adapters} adapters, the bank has {n}")
    else:
        if isinstance(adapter_ids, Tensor) and tuple(adapter_ids.shape) != lead:
            raise ValueError(f"adapter_ids must have x's leading shape {lead}, got {C.describe(adapter_ids)}")
        sched = adapter_schedule(adapter_ids, n)
    if sched.num_tokens != x.shape[:-1].numel():
        raise ValueError(f"adapter_ids has {sched.num_tokens} tokens, x has {lead} = {x.shape[:-1].numel()}")
    if sched.device != x.device:
        raise ValueError(f"adapter_ids must be on x's device {x.device}, got {sched.device}")
    return sched


class BankLayout(NamedTuple):
    """Offsets of a bank (see the module docstring), as tuples: adapter a's block in bank_a starts at row
    a_off[a] and has a_rows[a] rows; member m's part of it starts at column t_col[m][a] of the shrink
    output; member m's B rows start at b_off[m][a] of bank_bs[m]."""

    a_off: tuple
    a_rows: tuple
    t_col: tuple
    b_off: tuple


@functools.lru_cache(maxsize=256)
def host_meta(ranks: tuple, k: int) -> BankLayout:
    """The BankLayout of k members' ranks, flattened member-major (ranks[m * n + a] for adapter a)."""
    n = len(ranks) // k
    a_off, a_rows, t_col, b_off = [], [], [[0] * n for _ in range(k)], [[0] * n for _ in range(k)]
    row, b_row = 0, [0] * k
    for a in range(n):
        a_off.append(row)
        col = 0
        for m in range(k):
            r = ranks[m * n + a]
            t_col[m][a], b_off[m][a] = col, b_row[m]
            col += r
            b_row[m] += r
        a_rows.append(col)
        row += col
    return BankLayout(tuple(a_off), tuple(a_rows), tuple(map(tuple, t_col)), tuple(map(tuple, b_off)))
