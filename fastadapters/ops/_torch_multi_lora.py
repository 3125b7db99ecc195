"""The "torch" backend of multi_lora_linear and multi_bottleneck_adapter: the portable path in torch calls.

Implements the interface at the top of fastadapters/ops/multi_lora.py (and bottleneck_forward, that of
fastadapters/ops/multi_bottleneck.py); the bank layout and schedule are those of fastadapters/ops/schedule.py.
"""

import torch
from torch import Tensor

from fastadapters.ops._activations import TORCH_FNS
from fastadapters.ops.schedule import AdapterSchedule

# The torch backend runs its per-adapter GEMMs single-threaded when adapters average fewer tokens than this.
SMALL_SEGMENT_TOKENS = 64
# ... batches the adapters (a few bmm calls in all) when they average fewer tokens than this ...
BATCHED_BELOW = 32
# ... and batches rows of one adapter each (prefill through AdapterBank) from this many adapters present.
ROWS_FROM_ADAPTERS = 4


class TorchMultiLora:
    """The portable fast path, in torch calls. Two strategies, picked per call:

    - segments (prefill: many tokens per adapter): the base GEMM, then per adapter present a shrink of its
      tokens and an in-place addmm per member. Sorted ids take views of contiguous token ranges; otherwise
      the adapters' tokens are gathered once and their deltas added with one index_add per member.
    - batched (decode: a few tokens per adapter): adapters of equal ranks form one bucket; its tokens are
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
    def forward(
        x, weights, biases, bank_a, bank_bs, ranks, scales, layout, adapter_ids, order, starts, tiles
    ):
        ys = [x @ w.T if b is None else torch.addmm(b, x, w.T) for w, b in zip(weights, biases)]
        TorchMultiLora.add(x, ys, bank_a, bank_bs, ranks, scales, layout, adapter_ids, order, starts, tiles)
        return ys

    @staticmethod
    def bottleneck_forward(
        h, bank_down, bank_up, sizes, scales, layout, acts, adapter_ids, order, starts, tiles, residual
    ):
        out = (h if residual is None else residual).clone()
        TorchMultiLora.add(
            h, [out], bank_down, [bank_up], sizes, scales, layout, adapter_ids, order, starts, tiles, acts
        )
        return out

    @staticmethod
    def add(x, ys, bank_a, bank_bs, ranks, scales, meta, adapter_ids, order, starts, tiles, acts=None):
        """ys[m][i] += scale · f(x[i] A_{m,a}ᵀ) B_{m,a}ᵀ in place (f = acts[a] if given, else identity)."""
        k = len(ys)
        n = len(ranks) // k
        row_len = int(tiles[0, 0])
        tiles = tiles[1:]
        if n == 0 or x.shape[0] == 0 or tiles.numel() == 0:
            return
        a_rows = meta.a_rows
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
                            t = TORCH_FNS[acts[a]](t)
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
        place: tokens are neither gathered nor scattered. When one bucket covers the batch, rows of no
        adapter here ride along in its batch with their shrink and B zero-filled (never multiplied by zero:
        a NaN in the adapter they borrow must not reach them); otherwise each bucket gathers its rows."""
        a_off, a_rows, t_col, b_off = meta
        k, n = len(ys), len(ranks) // len(ys)
        count = x.shape[0] // row_len
        x3 = x.reshape(count, row_len, x.shape[1])
        row_ad = adapter_ids.view(count, row_len)[:, 0].tolist()
        buckets: dict[tuple, list[int]] = {}
        for i, a in enumerate(row_ad):
            if a >= 0 and a_rows[a]:
                act = None if acts is None else acts[a]
                buckets.setdefault((act, *(ranks[m * n + a] for m in range(k))), []).append(i)
        dev = x.device
        for (act, *sig), rows in buckets.items():
            whole = len(buckets) == 1
            first, in_bucket = row_ad[rows[0]], set(rows)
            # With one bucket the whole batch goes through it (no gather): other rows (base, or adapters
            # without LoRA here) borrow the bucket's first adapter's index and get zeros filled in.
            members = range(count) if whole else rows
            ad = [row_ad[i] if i in in_bucket else first for i in members]
            others = None
            if len(in_bucket) < len(members):
                others = torch.tensor([i not in in_bucket for i in members], device=dev)[:, None, None]
            xg = x3 if whole else x3[torch.tensor(rows, device=dev)]
            t = torch.bmm(xg, bank_a[_row_index([a_off[a] for a in ad], a_rows[first], dev)].mT)
            if act is not None:
                t = TORCH_FNS[act](t)
            for m, r in enumerate(sig):
                if not r:
                    continue
                c = t_col[m][first]
                row_scales = [scales[m * n + a] for a in ad]
                t_m = t[:, :, c : c + r] * torch.tensor(row_scales, device=dev, dtype=x.dtype)[:, None, None]
                lora_b = bank_bs[m][_row_index([b_off[m][a] for a in ad], r, dev)]
                if others is not None:  # both fresh tensors: 0 @ 0 adds exactly nothing to those rows
                    t_m.masked_fill_(others, 0)
                    lora_b.masked_fill_(others, 0)
                y3 = ys[m].view(count, row_len, ys[m].shape[1])
                if whole:
                    y3.baddbmm_(t_m, lora_b)
                else:
                    y3.index_add_(0, torch.tensor(rows, device=dev), torch.bmm(t_m, lora_b))

    @staticmethod
    def _batched(x, ys, bank_a, bank_bs, ranks, scales, acts, st, table, present, meta):
        a_off, a_rows, t_col, b_off = meta
        k, n = len(ys), len(ranks) // len(ys)
        buckets: dict[tuple, list[int]] = {}
        for i, a in enumerate(present):
            if a_rows[a]:
                act = None if acts is None else acts[a]
                buckets.setdefault((act, *(ranks[m * n + a] for m in range(k))), []).append(i)
        counts = table.shape[1] - 1
        for (act, *sig), rows in buckets.items():
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
                t_m = (t_m if act is None else TORCH_FNS[act](t_m)) * scale[:, None, None]
                lora_b = TorchMultiLora._rows(bank_bs[m], [b_off[m][a] for a in adapters], r)
                delta = torch.bmm(t_m, lora_b).view(-1, ys[m].shape[1])
                if padded:
                    # Padded rows point at token 0 (maybe another adapter's): their products are zero-filled,
                    # not multiplied by 0 (NaN weights or a NaN token would survive that).
                    delta.masked_fill_(~valid.view(-1, 1), 0)
                ys[m].index_add_(0, tok, delta)


def _row_index(offsets: list, rows: int, device) -> Tensor:
    """[len(offsets), rows]: o, o + 1, …, o + rows − 1 for each offset (gathers each row's A or B)."""
    return torch.tensor(offsets, device=device)[:, None] + torch.arange(rows, device=device)
