"""The multi-LoRA linear op (serving): one batch, many LoRA adapters, one launch per layer.

    y[i] = x[i] Wᵀ + b + scales[a] · (x[i] A_aᵀ) B_aᵀ,  a = adapter_ids[i]  (−1: the base layer only)

Bank layout (no padding to the largest rank: an adapter of rank r costs r rows, and tokens cost work in
proportion to their own adapter's rank):
    ranks = [r_0, …, r_{n-1}] (r_a >= 0; 0 = adapter a has no LoRA on this layer), off_a = r_0 + … + r_{a-1}
    bank_a [Σ r_a, d_in]:  rows off_a : off_a + r_a hold A_a   (the adapters' A stacked along the rank)
    bank_b [Σ r_a, d_out]: the same rows hold B_aᵀ              (B transposed, so each slice is contiguous)
The grouped form (q/k/v or gate/up: members m that read the same x) reads x once for one shrink:
    bank_a [Σ_a Σ_m r_{m,a}, d_in]: adapter a's rows form one block holding A_{0,a}, A_{1,a}, … stacked;
    bank_bs[m] [Σ_a r_{m,a}, d_out_m]: member m's B_{m,a}ᵀ in adapter order, as in the single form;
and each member's expand is added straight into that member's base output (in place, no delta tensor).

Tokens are never physically regrouped by the kernels: an `AdapterSchedule` (built once per batch by
`adapter_schedule` and shared by every layer) holds the token indices sorted by adapter and each adapter's
segment in that list. When the ids are already sorted (AdapterBank sorts the rows of a batch by adapter),
segments are contiguous token ranges and the torch backend works on views with no gather at all.

The op is inference-only: it has no backward (it raises if asked for one; train one adapter with
fastadapters.apply instead).

Backends implement, on x [N, d_in] (possibly strided):
    prepare(schedule) -> Tensor   backend data derived from the schedule (Triton: its tile table), cached
    forward(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles) -> ys
with ranks/scales flattened member-major (ranks[m * n + a]); order [N] int64 token indices sorted by
adapter (empty: the ids are sorted already, order = identity); starts [n + 1] int64: adapter a's tokens are
order[starts[a] : starts[a + 1]].
"""

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._dispatch import Backend, extension_reasons, select, traced, triton_reasons

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# The torch backend runs its per-adapter GEMMs single-threaded when adapters average fewer tokens than this.
SMALL_SEGMENT_TOKENS = 64
# ... batches the adapters (a few bmm calls in all) when they average fewer tokens than this ...
BATCHED_BELOW = 32
# ... and batches rows of one adapter each (prefill through AdapterBank) from this many adapters present.
ROWS_FROM_ADAPTERS = 4
# The bottleneck activations by code (the order of fastadapters.ops.bottleneck.ACTIVATIONS).
ACTIVATION_FNS = (torch.tanh, torch.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.sigmoid)


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
    for op, backends in (("multi_lora_linear", BACKENDS), ("multi_bottleneck_adapter", BOTTLENECK_BACKENDS)):
        try:
            _prepared(schedule, select(op, backends, schedule.device))
        except RuntimeError:  # no backend here: the op call itself raises with the reasons
            pass
    return schedule


def _prepared(schedule: AdapterSchedule, backend: Backend) -> Tensor:
    """The backend's data for this schedule (e.g. Triton's tile table), computed once per backend."""
    tiles = schedule.prepared.get(backend.name)
    if tiles is None:
        tiles = schedule.prepared[backend.name] = backend.module().prepare(schedule)
    return tiles


@functools.lru_cache(maxsize=256)
def host_meta(ranks: tuple, k: int):
    """Offsets of the flattened (member-major) ranks, as Python lists.

    Returns (a_off, a_rows, t_col, b_off): adapter a's block in bank_a starts at row a_off[a] and has
    a_rows[a] rows; member m's part of it starts at column t_col[m][a] of the shrink output; member m's B
    rows start at b_off[m][a] of bank_bs[m].
    """
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
    return a_off, a_rows, t_col, b_off


class TorchMultiLora:
    """The portable fast path, in torch calls. Two strategies, picked per call:

    - segments (prefill: many tokens per adapter): the base GEMM, then per adapter present a shrink of its
      tokens and an in-place addmm per member. Sorted ids take views of contiguous token ranges; otherwise
      the adapters' tokens are gathered once and their deltas added with one index_add per member.
    - batched (decode: a few tokens per adapter): adapters of equal ranks form one group; its tokens are
      padded to [adapters, tokens, d_in] and one bmm shrinks them, one bmm per member expands, one
      index_add per member adds: a handful of calls per layer however many adapters, rather than two
      tiny GEMMs per adapter and member. Padding is on tokens only (never ranks), and only chosen when it
      at most doubles the rows.
    prepare() lists each present adapter's token positions, padded (the table the batched path reads).
    """

    @staticmethod
    def prepare(schedule: AdapterSchedule) -> Tensor:
        """[1 + adapters present, 1 + c] int64: row 0 is (row_len, 0, …); then per adapter present, the
        adapter and its tokens' indices (−1 pads to c columns)."""
        st = schedule.starts.tolist()
        present = [a for a in range(schedule.num_adapters) if st[a + 1] > st[a]]
        head = torch.tensor([[schedule.row_len]], device=schedule.device)
        if not present:
            return head
        dev = schedule.device
        first = torch.tensor([st[a] for a in present], device=dev)
        count = torch.tensor([st[a + 1] - st[a] for a in present], device=dev)
        steps = torch.arange(int(count.max()), device=dev)
        valid = steps < count[:, None]
        pos = (first[:, None] + steps).clamp(max=schedule.num_tokens - 1)
        tok = pos if schedule.order.numel() == 0 else schedule.order[pos]
        table = torch.cat([torch.tensor(present, device=dev)[:, None], torch.where(valid, tok, -1)], dim=1)
        return torch.cat([torch.nn.functional.pad(head, (0, table.shape[1] - 1)), table])

    @staticmethod
    def forward(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles):
        ys = [x @ w.T if b is None else torch.addmm(b, x, w.T) for w, b in zip(weights, biases)]
        TorchMultiLora.add(x, ys, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles)
        return ys

    @staticmethod
    def bottleneck_forward(
        h, bank_down, bank_up, sizes, scales, acts, adapter_ids, order, starts, tiles, residual
    ):
        out = (h if residual is None else residual).clone()
        TorchMultiLora.add(
            h, [out], bank_down, [bank_up], sizes, scales, adapter_ids, order, starts, tiles, acts
        )
        return out

    @staticmethod
    def add(x, ys, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles, acts=None):
        """ys[m][i] += scale · f(x[i] A_{m,a}ᵀ) B_{m,a}ᵀ in place (f = acts[a] if given, else identity)."""
        k = len(ys)
        n = len(ranks) // k
        row_len = int(tiles[0, 0])
        tiles = tiles[1:]
        if n == 0 or x.shape[0] == 0 or tiles.numel() == 0:
            return
        meta = host_meta(tuple(ranks), k)
        a_rows = meta[1]
        present = tiles[:, 0].tolist()
        active = [a for a in present if a_rows[a] > 0]
        if not active:
            return
        rows = x.shape[0] // max(row_len, 1)
        if (
            row_len > 1
            and len(active) >= ROWS_FROM_ADAPTERS
            and rows * max(a_rows[a] for a in active) <= x.shape[0]
        ):
            args = (x, ys, bank_a, bank_bs, ranks, scales, acts)
            TorchMultiLora._rows_batched(*args, adapter_ids, row_len, meta)
            return
        st = starts.tolist()
        tokens = sum(st[a + 1] - st[a] for a in active)
        if tokens < BATCHED_BELOW * len(active) and len(active) * (tiles.shape[1] - 1) <= 2 * tokens:
            TorchMultiLora._batched(x, ys, bank_a, bank_bs, ranks, scales, acts, st, tiles, present, meta)
            return
        segments = [(a, st[a], st[a + 1]) for a in active]
        if order.numel() == 0:
            TorchMultiLora._segments(x, 0, ys, bank_a, bank_bs, ranks, scales, acts, segments, meta)
            return
        lo, hi = st[0], st[n]
        index = order[lo:hi]
        deltas = [y.new_zeros(hi - lo, y.shape[1]) for y in ys]
        # One gather of the adapters' tokens, one index_add per member: never a gather per adapter.
        xs = x.index_select(0, index)
        TorchMultiLora._segments(xs, lo, deltas, bank_a, bank_bs, ranks, scales, acts, segments, meta)
        for y, delta in zip(ys, deltas):
            y.index_add_(0, index, delta)

    @staticmethod
    def _segments(x, lo, outs, bank_a, bank_bs, ranks, scales, acts, segments, meta):
        """outs[m][s-lo : e-lo] += scale · (x[s-lo : e-lo] A_{m,a}ᵀ) B_{m,a}ᵀ for each adapter segment."""
        threads = torch.get_num_threads() if x.device.type == "cpu" else 1
        small = threads > 1 and (segments[-1][2] - segments[0][1]) < SMALL_SEGMENT_TOKENS * len(segments)
        if small:
            # Rank-r GEMMs over a few dozen tokens gain nothing from a second thread, and each one opens an
            # OpenMP region whose join stalls whenever a core is busy elsewhere: run them on this thread.
            # (Over ~128 tokens the second thread wins on an idle machine: 1.43x vs 1.62x base measured.)
            torch.set_num_threads(1)
        try:
            a_off, _, t_col, b_off = meta
            k, n = len(outs), len(ranks) // len(outs)
            for a, s, e in segments:
                xs = x[s - lo : e - lo]
                for m in range(k):
                    r = ranks[m * n + a]
                    if r:
                        # One shrink per member: a column slice of a shared [tokens, Σ r] shrink is a
                        # strided operand, which sends MKL's small GEMMs down a path several times slower.
                        row = a_off[a] + t_col[m][a]
                        t = xs @ bank_a[row : row + r].T
                        if acts is not None:
                            t = ACTIVATION_FNS[acts[a]](t)
                        o = b_off[m][a]
                        outs[m][s - lo : e - lo].addmm_(t, bank_bs[m][o : o + r], alpha=scales[m * n + a])
        finally:
            if small:
                torch.set_num_threads(threads)

    @staticmethod
    def _rows(bank: Tensor, offsets: list, rows: int) -> Tensor:
        """[len(offsets), rows, width]: bank[o : o + rows] per offset (a view when they are consecutive)."""
        first = offsets[0]
        if offsets == list(range(first, first + rows * len(offsets), rows)):
            return bank[first : first + rows * len(offsets)].view(len(offsets), rows, bank.shape[1])
        index = torch.tensor(offsets, device=bank.device)[:, None] + torch.arange(rows, device=bank.device)
        return bank[index]

    @staticmethod
    def _rows_batched(x, ys, bank_a, bank_bs, ranks, scales, acts, adapter_ids, row_len, meta):
        """Rows of one adapter each (prefill): x viewed as [rows, L, d_in], each row's A and B gathered
        ([rows, r, d], far smaller than x when L >= r), one bmm shrinks and one baddbmm per member adds in
        place: tokens are neither gathered nor scattered. Rows of other rank signatures (or none) get a
        zero scale in a group's batch when that group covers the batch, else are gathered as rows."""
        a_off, a_rows, t_col, b_off = meta
        k, n = len(ys), len(ranks) // len(ys)
        count = x.shape[0] // row_len
        x3 = x.reshape(count, row_len, x.shape[1])
        row_ad = adapter_ids.view(count, row_len)[:, 0].tolist()
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(row_ad):
            if a >= 0 and a_rows[a]:
                act = None if acts is None else acts[a]
                groups.setdefault((act, *(ranks[m * n + a] for m in range(k))), []).append(i)
        dev = x.device
        for (act, *sig), rows in groups.items():
            whole = len(groups) == 1
            first, in_group = row_ad[rows[0]], set(rows)
            # With one group the whole batch goes through it (no gather): other rows (base, or adapters
            # without LoRA here) borrow the group's first adapter and get scale 0.
            members = range(count) if whole else rows
            ad = [row_ad[i] if i in in_group else first for i in members]
            keep = [1.0 if i in in_group else 0.0 for i in members]
            xg = x3 if whole else x3[torch.tensor(rows, device=dev)]
            t = torch.bmm(xg, bank_a[_row_index([a_off[a] for a in ad], a_rows[first], dev)].mT)
            if act is not None:
                t = ACTIVATION_FNS[act](t)
            for m, r in enumerate(sig):
                if not r:
                    continue
                c = t_col[m][first]
                row_scales = [w * scales[m * n + a] for w, a in zip(keep, ad)]
                t_m = t[:, :, c : c + r] * torch.tensor(row_scales, device=dev, dtype=x.dtype)[:, None, None]
                lora_b = bank_bs[m][_row_index([b_off[m][a] for a in ad], r, dev)]
                y3 = ys[m].view(count, row_len, ys[m].shape[1])
                if whole:
                    y3.baddbmm_(t_m, lora_b)
                else:
                    y3.index_add_(0, torch.tensor(rows, device=dev), torch.bmm(t_m, lora_b))

    @staticmethod
    def _batched(x, ys, bank_a, bank_bs, ranks, scales, acts, st, table, present, meta):
        a_off, a_rows, t_col, b_off = meta
        k, n = len(ys), len(ranks) // len(ys)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(present):
            if a_rows[a]:
                act = None if acts is None else acts[a]
                groups.setdefault((act, *(ranks[m * n + a] for m in range(k))), []).append(i)
        counts = table.shape[1] - 1
        for (act, *sig), rows in groups.items():
            sub = table if len(rows) == len(present) else table[torch.tensor(rows, device=table.device)]
            adapters = [present[i] for i in rows]
            tok = sub[:, 1:]
            padded = sum(st[a + 1] - st[a] for a in adapters) < len(rows) * counts
            if padded:
                valid = tok >= 0
                tok = tok.clamp(min=0)
            tok = tok.reshape(-1)
            xg = x[tok].view(len(rows), counts, x.shape[1])
            lora_a = TorchMultiLora._rows(bank_a, [a_off[a] for a in adapters], a_rows[adapters[0]])
            t = torch.bmm(xg, lora_a.mT)
            for m, r in enumerate(sig):
                if not r:
                    continue
                c = t_col[m][adapters[0]]
                scale = torch.tensor([scales[m * n + a] for a in adapters], device=x.device, dtype=x.dtype)
                t_m = t[:, :, c : c + r]
                t_m = (t_m if act is None else ACTIVATION_FNS[act](t_m)) * scale[:, None, None]
                if padded:
                    t_m.mul_(valid[..., None])  # padded rows point at token 0: make them add nothing
                lora_b = TorchMultiLora._rows(bank_bs[m], [b_off[m][a] for a in adapters], r)
                ys[m].index_add_(0, tok, torch.bmm(t_m, lora_b).view(-1, ys[m].shape[1]))


def _row_index(offsets: list, rows: int, device) -> Tensor:
    """[len(offsets), rows]: o, o + 1, …, o + rows − 1 for each offset (gathers each row's A or B)."""
    return torch.tensor(offsets, device=device)[:, None] + torch.arange(rows, device=device)


def _cpu_reasons(device, **info) -> list[str]:
    why = extension_reasons(device, "cpu")
    if not why and not hasattr(torch.ops.fastadapters_C, "multi_lora_forward"):
        why = ["fastadapters._C has no CPU multi-LoRA kernel"]
    return why


BACKENDS = {
    "triton": Backend(
        "triton", "fastadapters.kernels.multi_lora", lambda device, **info: triton_reasons(device)
    ),
    "cpu": Backend("cpu", "fastadapters.ops._cpu_multi_lora", _cpu_reasons),
    "cuda": Backend(
        "cuda", "fastadapters.ops._cuda_multi_lora", lambda device, **info: extension_reasons(device, "cuda")
    ),
    "torch": Backend("torch", TorchMultiLora, lambda device, **info: []),
}


def _backend(x: Tensor) -> Backend:
    return select("multi_lora_linear", BACKENDS, x.device, dtype=x.dtype)


@torch.library.custom_op("fastadapters::multi_lora_linear", mutates_args=())
def _multi_lora_op(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    bank_a: Tensor,
    bank_bs: list[Tensor],
    ranks: list[int],
    scales: list[float],
    adapter_ids: Tensor,
    order: Tensor,
    starts: Tensor,
    tiles: Tensor,
) -> list[Tensor]:
    biases = [None if b.numel() == 0 else b for b in biases]
    return _forward(
        _backend(x), x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles
    )


def _forward(backend, x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles):
    """The backend's forward on x flattened to 2-D (biases None-able)."""
    x2 = x.reshape(-1, x.shape[-1])
    ys = backend.module().forward(
        x2, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles
    )
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _eager(x: Tensor, *tensors) -> bool:
    """Whether the op may skip its custom-op wrapper: not traced, and no gradient wanted (the wrapper is
    what raises the clear no-backward error)."""
    if traced(x):
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, *tensors))


@_multi_lora_op.register_fake
def _(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


def _no_backward(ctx, grads):
    raise RuntimeError(
        "multi_lora_linear is inference-only and has no backward; run it under torch.no_grad() (train one "
        "adapter at a time with fastadapters.apply)"
    )


_multi_lora_op.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def _int_list(name: str, values) -> list[int]:
    if isinstance(values, Tensor):
        values = values.tolist()
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must hold ints >= 0 (0 = no LoRA for that adapter), got {out!r}")
    return out


def _float_list(name: str, values, n: int) -> list[float]:
    if isinstance(values, Tensor):
        values = values.tolist()
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of floats, got {type(values).__name__}") from None
    if len(out) != n:
        raise ValueError(f"{name} must have one value per adapter ({n}), got {len(out)}")
    return [C.check_scale(f"{name}[{i}]", v) for i, v in enumerate(out)]


def _schedule(adapter_ids, x: Tensor, n: int) -> AdapterSchedule:
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


def _check_weight(sfx: str, x: Tensor, weight, bias) -> int:
    w = C.check_tensor(f"weight{sfx}", weight, ndim=2)
    C.check_like(f"weight{sfx}", w, "x", x)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight{sfx} must have shape (d_out, {x.shape[-1]}) to match x, got {C.describe(w)}"
        )
    if bias is not None:
        C.check_tensor(f"bias{sfx}", bias, ndim=1)
        C.check_like(f"bias{sfx}", bias, "x", x)
        C.check_shape(f"bias{sfx}", bias, (w.shape[0],), "d_out")
    return w.shape[0]


def _run(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, grouped: bool) -> list[Tensor]:
    C.check_tensor("x", x, min_ndim=1)
    k = len(weights)
    sfx = (lambda m: f"[{m}]") if grouped else (lambda m: "")
    d_outs = [_check_weight(sfx(m), x, w, b) for m, (w, b) in enumerate(zip(weights, biases))]
    if grouped:
        if not isinstance(ranks, (list, tuple)) or len(ranks) != k:
            raise ValueError(f"ranks must hold one sequence per member ({k}), got {ranks!r}")
        ranks = [_int_list(f"ranks[{m}]", r) for m, r in enumerate(ranks)]
        n = len(ranks[0])
        if any(len(r) != n for r in ranks):
            raise ValueError(
                f"every member's ranks must cover the same adapters, got lengths {[len(r) for r in ranks]}"
            )
        if not isinstance(scales, (list, tuple)) or len(scales) != k:
            raise ValueError(f"scales must hold one sequence per member ({k}), got {scales!r}")
        scales = [_float_list(f"scales[{m}]", s, n) for m, s in enumerate(scales)]
    else:
        ranks = [_int_list("ranks", ranks)]
        n = len(ranks[0])
        scales = [_float_list("scales", scales, n)]
    a = C.check_tensor("bank_a", bank_a, ndim=2)
    C.check_like("bank_a", a, "x", x)
    C.check_shape("bank_a", a, (sum(map(sum, ranks)), x.shape[-1]), "sum of the ranks, d_in")
    for m, (bank_b, d_out) in enumerate(zip(bank_bs, d_outs)):
        name = f"bank_b{sfx(m)}"
        C.check_tensor(name, bank_b, ndim=2)
        C.check_like(name, bank_b, "x", x)
        C.check_shape(name, bank_b, (sum(ranks[m]), d_out), "sum of the ranks, d_out")
    sched = _schedule(adapter_ids, x, n)
    tensors = [x, *weights, *[b for b in biases if b is not None], bank_a, *bank_bs]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "multi_lora_linear is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or on tensors that do not require grad"
        )
    flat_ranks = [r for member in ranks for r in member]
    flat_scales = [s for member in scales for s in member]
    return run_unchecked(x, weights, biases, bank_a, bank_bs, flat_ranks, flat_scales, sched)


def run_unchecked(x, weights, biases, bank_a, bank_bs, ranks: list, scales: list, schedule: AdapterSchedule):
    """The grouped op without the input checks, for callers that validated their bank once (AdapterBank).

    ranks/scales flattened member-major (ranks[m * n + a]); biases entries may be None.
    """
    backend = _backend(x)
    tiles = _prepared(schedule, backend)
    if _eager(x, *weights, *biases, bank_a, *bank_bs):
        return _forward(
            backend, x, weights, biases, bank_a, bank_bs, ranks, scales,
            schedule.adapter_ids, schedule.order, schedule.starts, tiles,
        )  # fmt: skip
    biases = [x.new_empty(0) if b is None else b for b in biases]
    return _multi_lora_op(
        x, list(weights), biases, bank_a, list(bank_bs), ranks, scales,
        schedule.adapter_ids, schedule.order, schedule.starts, tiles,
    )  # fmt: skip


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bank_a: Tensor,
    bank_b: Tensor,
    ranks,
    scales,
    adapter_ids,
) -> Tensor:
    """y[i] = x[i] Wᵀ + b + scales[a] · (x[i] A_aᵀ) B_aᵀ with a = adapter_ids[i] (−1: no adapter).

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; ranks: n ints >= 0; scales: n floats;
    bank_a: [Σ ranks, d_in], rows off_a : off_a + ranks[a] hold A_a (off_a = Σ_{b<a} ranks[b]);
    bank_b: [Σ ranks, d_out], the same rows hold B_aᵀ; adapter_ids: integers of shape x.shape[:-1], or an
    AdapterSchedule from adapter_schedule (reused across layers). Inference only (no backward).
    """
    return _run(x, [weight], [bias], bank_a, [bank_b], ranks, scales, adapter_ids, grouped=False)[0]


def multi_lora_linear_grouped(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    bank_a: Tensor,
    bank_bs: list[Tensor],
    ranks,
    scales,
    adapter_ids,
) -> list[Tensor]:
    """ys[m][i] = x[i] W_mᵀ + b_m + scales[m][a] · (x[i] A_{m,a}ᵀ) B_{m,a}ᵀ, a = adapter_ids[i]; x read once.

    x: [..., d_in]; weights[m]: [d_out_m, d_in]; biases[m]: [d_out_m] or None; ranks[m], scales[m]: member
    m's n ranks (>= 0) and scales; bank_a: [Σ_a Σ_m ranks[m][a], d_in], adapter a's block holds A_{0,a},
    A_{1,a}, … stacked (blocks in adapter order); bank_bs[m]: [Σ_a ranks[m][a], d_out_m] holding B_{m,a}ᵀ in
    adapter order; adapter_ids: as in multi_lora_linear. Inference only (no backward).
    """
    k = len(weights)
    if k == 0 or len(biases) != k or len(bank_bs) != k:
        raise ValueError(
            f"weights, biases and bank_bs must be non-empty lists of one length, got {len(weights)}, "
            f"{len(biases)}, {len(bank_bs)}"
        )
    return _run(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, grouped=True)


# --------------------------------------------------------------------------------------------- bottleneck
# The per-row bottleneck adapter: out[i] = res[i] + s_a · f_a(h[i] D_aᵀ) U_aᵀ, a = adapter_ids[i]. The same
# bank layout, schedule and kernels as multi-LoRA (the shrink is h Dᵀ, the expand adds f(t) Uᵀ), with the
# adapter's activation applied between them and the residual (h, or the base layer's output) as the base.
# Backends add to the interface above:
#     bottleneck_forward(h, bank_down, bank_up, sizes, scales, activations, adapter_ids, order, starts,
#                        tiles, residual) -> out   (activations: codes into ACTIVATIONS; residual or None)


def _cpu_bottleneck_reasons(device, **info) -> list[str]:
    why = extension_reasons(device, "cpu")
    if not why and not hasattr(torch.ops.fastadapters_C, "multi_bottleneck_forward"):
        why = ["fastadapters._C has no CPU per-row bottleneck kernel"]
    return why


BOTTLENECK_BACKENDS = {
    "triton": BACKENDS["triton"],
    "cpu": Backend("cpu", "fastadapters.ops._cpu_multi_bottleneck", _cpu_bottleneck_reasons),
    "torch": BACKENDS["torch"],
}


def _bottleneck_backend(h: Tensor) -> Backend:
    return select("multi_bottleneck_adapter", BOTTLENECK_BACKENDS, h.device, dtype=h.dtype)


@torch.library.custom_op("fastadapters::multi_bottleneck_adapter", mutates_args=())
def _multi_bottleneck_op(
    h: Tensor,
    bank_down: Tensor,
    bank_up: Tensor,
    sizes: list[int],
    scales: list[float],
    activations: list[int],
    adapter_ids: Tensor,
    order: Tensor,
    starts: Tensor,
    tiles: Tensor,
    residual: Tensor,
    has_residual: bool,
) -> Tensor:
    res = residual if has_residual else None
    return _bottleneck_forward(
        _bottleneck_backend(h), h, bank_down, bank_up, sizes, scales, activations, adapter_ids, order, starts,
        tiles, res,
    )  # fmt: skip


def _bottleneck_forward(
    backend, h, bank_down, bank_up, sizes, scales, activations, adapter_ids, order, starts, tiles, residual
):
    """The backend's bottleneck_forward on h flattened to 2-D (residual None-able)."""
    h2 = h.reshape(-1, h.shape[-1])
    res = None if residual is None else residual.reshape(h2.shape[0], -1)
    out = backend.module().bottleneck_forward(
        h2, bank_down, bank_up, sizes, scales, activations, adapter_ids, order, starts, tiles, res
    )
    return out.reshape(*h.shape[:-1], out.shape[-1])


@_multi_bottleneck_op.register_fake
def _(
    h, bank_down, bank_up, sizes, scales, activations, adapter_ids, order, starts, tiles, residual, has_res
):
    return h.new_empty(*h.shape[:-1], bank_up.shape[1])


_multi_bottleneck_op.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def run_bottleneck_unchecked(h, bank_down, bank_up, sizes, scales, activations, schedule, residual=None):
    """multi_bottleneck_adapter without the input checks (AdapterBank); activations as codes."""
    backend = _bottleneck_backend(h)
    tiles = _prepared(schedule, backend)
    if _eager(h, bank_down, bank_up, residual):
        return _bottleneck_forward(
            backend, h, bank_down, bank_up, sizes, scales, activations, schedule.adapter_ids, schedule.order,
            schedule.starts, tiles, residual,
        )  # fmt: skip
    return _multi_bottleneck_op(
        h, bank_down, bank_up, sizes, scales, activations, schedule.adapter_ids, schedule.order,
        schedule.starts, tiles, h.new_empty(0) if residual is None else residual, residual is not None,
    )  # fmt: skip


def multi_bottleneck_adapter(
    h: Tensor,
    bank_down: Tensor,
    bank_up: Tensor,
    sizes,
    scales,
    activations,
    adapter_ids,
    residual: Tensor | None = None,
) -> Tensor:
    """out[i] = res[i] + scales[a] · f_a(h[i] D_aᵀ) U_aᵀ with a = adapter_ids[i] (−1: out[i] = res[i]).

    h: [..., d_in]; res = h when residual is None (series; d_out = d_in) or residual: [..., d_out] (the base
    layer's output: the parallel form); sizes: n bottleneck sizes >= 0; scales: n floats; activations: n
    names of ACTIVATIONS (tanh, relu, gelu (exact erf), silu, sigmoid); bank_down: [Σ sizes, d_in], rows
    off_a : off_a + sizes[a] hold D_a; bank_up: [Σ sizes, d_out], the same rows hold U_aᵀ; adapter_ids: as
    in multi_lora_linear (a tensor of h.shape[:-1] or an AdapterSchedule). Inference only (no backward).
    """
    from fastadapters.ops.bottleneck import ACTIVATIONS

    C.check_tensor("h", h, min_ndim=1)
    sizes = _int_list("sizes", sizes)
    n = len(sizes)
    scales = _float_list("scales", scales, n)
    if isinstance(activations, str) or len(activations) != n:
        raise ValueError(f"activations must hold one name per adapter ({n}), got {activations!r}")
    bad = [a for a in activations if a not in ACTIVATIONS]
    if bad:
        raise ValueError(f"activations must be names in {ACTIVATIONS}, got {bad}")
    down = C.check_tensor("bank_down", bank_down, ndim=2)
    C.check_like("bank_down", down, "h", h)
    C.check_shape("bank_down", down, (sum(sizes), h.shape[-1]), "sum of the sizes, d_in")
    up = C.check_tensor("bank_up", bank_up, ndim=2)
    C.check_like("bank_up", up, "h", h)
    if up.shape[0] != sum(sizes):
        raise ValueError(
            f"bank_up must have shape ({sum(sizes)}, d_out) (sum of the sizes), got {C.describe(up)}"
        )
    if residual is None:
        if up.shape[1] != h.shape[-1]:
            raise ValueError(
                f"bank_up must have shape ({sum(sizes)}, {h.shape[-1]}) for the series form (residual=None "
                f"adds h), got {C.describe(up)}; pass residual for the parallel form"
            )
    else:
        C.check_tensor("residual", residual, min_ndim=1)
        C.check_like("residual", residual, "h", h)
        C.check_shape("residual", residual, (*h.shape[:-1], up.shape[1]), "h's leading dims, d_out")
    sched = _schedule(adapter_ids, h, n)
    tensors = [h, down, up, *([] if residual is None else [residual])]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "multi_bottleneck_adapter is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or on tensors that do not require grad"
        )
    codes = [ACTIVATIONS.index(a) for a in activations]
    return run_bottleneck_unchecked(h, down, up, sizes, scales, codes, sched, residual)
