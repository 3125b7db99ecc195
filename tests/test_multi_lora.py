"""The multi-LoRA op against fastadapters.reference.multi_lora_linear, on every backend that can run here.

Ranks 1, 8, 16, 64 and 0 (an adapter absent from a layer) mixed in one bank; fp32, fp16, bf16; adapter
spreads over the batch (distinct, uniform, zipf, identical, all-base); prefill (segments of rows) and decode
(one token per row) shapes; sorted and unsorted ids; the grouped form (q/k/v: one shrink, several
outputs); non-contiguous x and transposed weights; empty batches and empty banks; a schedule reused across
calls; the Triton split-K path; bad input.
"""

import math

import pytest
import torch
from conftest import DEVICE, TOLERANCES, assert_close, skip_module_without_device

from fastadapters import ops, reference
from fastadapters.ops import _torch_multi_lora as torch_ml
from fastadapters.ops import multi_lora as ml

skip_module_without_device()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RANKS = [1, 8, 0, 16, 64, 8]
SPREADS = ("distinct", "uniform", "zipf", "identical", "all-base")


def _backend_params(table):
    params = []
    for name in ("torch", "triton", "cpu", "cuda"):
        if name not in table:
            continue
        why = table[name].reasons(device=DEVICE, dtype=torch.float32)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why))))
    return params


BACKENDS = _backend_params(ml.BACKENDS)


def row_adapters(spread: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """One adapter id per row (−1 = base) following `spread`."""
    if spread == "distinct":
        return torch.randperm(max(rows, n), generator=gen)[:rows] % n
    if spread == "uniform":
        return torch.randint(-1, n, (rows,), generator=gen)
    if spread == "zipf":
        weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, rows, replacement=True, generator=gen)
    if spread == "identical":
        return torch.full((rows,), int(torch.randint(0, n, (), generator=gen)))
    if spread == "all-base":
        return torch.full((rows,), -1)
    raise ValueError(spread)


def make_bank(d_in, d_outs, ranks, dtype, gen):
    """(weights, biases, bank_a, bank_bs, scales) of a grouped bank, scaled so outputs are O(1)."""
    k, n = len(d_outs), len(ranks[0])
    weights = [torch.randn(d, d_in, generator=gen) / math.sqrt(d_in) for d in d_outs]
    biases = [torch.randn(d, generator=gen) for d in d_outs]
    a_rows = [sum(ranks[m][a] for m in range(k)) for a in range(n)]
    bank_a = torch.randn(sum(a_rows), d_in, generator=gen) / math.sqrt(d_in)
    bank_bs = [
        torch.randn(sum(ranks[m]), d, generator=gen) / math.sqrt(max(ranks[m]) or 1)
        for m, d in enumerate(d_outs)
    ]
    scales = [[float(torch.empty(()).uniform_(-2, 2, generator=gen)) for _ in range(n)] for _ in range(k)]

    def cast(t):
        return t.to(DEVICE, dtype)

    return (
        [cast(w) for w in weights],
        [cast(b) for b in biases],
        cast(bank_a),
        [cast(b) for b in bank_bs],
        scales,
    )


def check_single(backend, dtype, x, weight, bias, bank_a, bank_b, ranks, scales, ids, name="y"):
    with ops.use_backend(backend):
        y = ops.multi_lora_linear(x, weight, bias, bank_a, bank_b, ranks, scales, ids)
    plain_ids = ids.adapter_ids if isinstance(ids, ops.AdapterSchedule) else ids
    expected = reference.multi_lora_linear(x, weight, bias, bank_a, bank_b, ranks, scales, plain_ids)
    assert y.dtype == x.dtype and y.shape == expected.shape
    assert_close(y, expected, dtype, name=name)


# --------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_matches_reference(backend, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    rows, seq = (5, 7) if shape == "prefill" else (13, 1)
    d_in, d_out = 37, 45
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(d_in, [d_out], [RANKS], dtype, gen)
    ids = row_adapters("uniform", rows, len(RANKS), gen)[:, None].expand(rows, seq).to(DEVICE)
    x = torch.randn(rows, seq, d_in, generator=gen).to(DEVICE, dtype)
    check_single(backend, dtype, x, w, b, bank_a, bank_b, RANKS, scales, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", SPREADS)
def test_adapter_spreads(backend, spread):
    gen = torch.Generator().manual_seed(2)
    rows, seq, d_in, d_out = 9, 3, 33, 20
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(d_in, [d_out], [RANKS], torch.float32, gen)
    row_ids = row_adapters(spread, rows, len(RANKS), gen)
    for ids in (row_ids.sort().values, row_ids):  # sorted (the bank's order) and as given
        ids = ids[:, None].expand(rows, seq).to(DEVICE)
        x = torch.randn(rows, seq, d_in, generator=gen).to(DEVICE)
        check_single(backend, torch.float32, x, w, b, bank_a, bank_b, RANKS, scales, ids, name=spread)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_ids_and_layouts(backend):
    """Ids varying within a row; x a non-contiguous view; the weight a transposed view (HF Conv1D)."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out, n_tok = 29, 31, 23
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(d_in, [d_out], [RANKS], torch.float32, gen)
    x = torch.randn(d_in, n_tok, generator=gen).to(DEVICE).T  # strided x
    w_t = w.T.contiguous().T  # [d_out, d_in] view of a [d_in, d_out] tensor
    ids = torch.randint(-1, len(RANKS), (n_tok,), generator=gen).to(DEVICE)
    check_single(backend, torch.float32, x, w_t, None, bank_a, bank_b, RANKS, scales, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_matches_reference(backend, dtype):
    """q/k/v: members with different widths and ranks (0 = the adapter skips that member)."""
    gen = torch.Generator().manual_seed(4)
    ranks = [[8, 1, 16, 0, 4], [8, 0, 16, 2, 4], [0, 1, 16, 64, 4]]
    d_in, d_outs = 40, [40, 17, 17]
    weights, biases, bank_a, bank_bs, scales = make_bank(d_in, d_outs, ranks, dtype, gen)
    biases[1] = None
    ids = row_adapters("uniform", 11, 5, gen)[:, None].expand(11, 2).to(DEVICE)
    x = torch.randn(11, 2, d_in, generator=gen).to(DEVICE, dtype)
    with ops.use_backend(backend):
        ys = ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, ids)
    expected = reference.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, ids)
    assert len(ys) == 3
    for m, (y, e) in enumerate(zip(ys, expected)):
        assert_close(y, e, dtype, name=f"member {m}")


def test_grouped_reference_is_per_member_reference():
    """The grouped layout read back member by member equals the single-member op on that member's bank."""
    gen = torch.Generator().manual_seed(5)
    ranks = [[2, 3], [1, 0]]
    weights, biases, bank_a, bank_bs, scales = make_bank(6, [5, 4], ranks, torch.float32, gen)
    # adapter 0: rows 0-1 = A_{0,0}, row 2 = A_{1,0}; adapter 1: rows 3-5 = A_{0,1}
    member0 = torch.cat([bank_a[0:2], bank_a[3:6]])
    ids = torch.tensor([1, 0, -1, 1]).to(DEVICE)
    x = torch.randn(4, 6, generator=gen).to(DEVICE)
    ys = reference.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, ids)
    y0 = reference.multi_lora_linear(x, weights[0], biases[0], member0, bank_bs[0], ranks[0], scales[0], ids)
    torch.testing.assert_close(ys[0], y0)
    # The explicit math for token 1 (adapter 0) of member 1.
    e = x[1] @ weights[1].T + biases[1] + scales[1][0] * (x[1] @ bank_a[2:3].T) @ bank_bs[1][0:1]
    torch.testing.assert_close(ys[1][1], e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_reused_and_empty(backend):
    gen = torch.Generator().manual_seed(6)
    d_in, d_out = 19, 21
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(d_in, [d_out], [RANKS], torch.float32, gen)
    ids = torch.tensor([3, 3, -1, 0, 4, 4, 1]).to(DEVICE)
    sched = ops.adapter_schedule(ids, len(RANKS))
    for seed in range(2):  # two layers sharing one schedule
        x = torch.randn(7, d_in, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        check_single(backend, torch.float32, x, w, b, bank_a, bank_b, RANKS, scales, sched)
    assert backend in sched.prepared
    empty = torch.empty(0, 4, d_in, device=DEVICE)
    with ops.use_backend(backend):
        y = ops.multi_lora_linear(
            empty, w, b, bank_a, bank_b, RANKS, scales, torch.empty(0, 4, dtype=torch.long)
        )
        assert y.shape == (0, 4, d_out)
        # An empty bank: every id must be −1; the output is the base layer.
        x = torch.randn(3, d_in, device=DEVICE)
        y = ops.multi_lora_linear(x, w, b, bank_a[:0], bank_b[:0], [], [], torch.full((3,), -1))
    torch.testing.assert_close(y, torch.addmm(b, x, w.T))


def test_schedule_backend_follows_forced_backend():
    """A schedule chooses each op's backend once, but a forced backend set later still applies."""
    sched = ops.adapter_schedule(torch.tensor([0, 1]), 2)
    default = ops.backend_for("multi_lora_linear")
    with ops.use_backend("torch"):
        assert sched.backend("multi_lora_linear", torch.float32).name == "torch"
    with ops.use_backend(None):
        assert sched.backend("multi_lora_linear", torch.float32).name == default
        assert sched.backend("multi_bottleneck_adapter", torch.float32).name == ops.backend_for(
            "multi_bottleneck_adapter"
        )


def test_schedule_contents():
    sched = ops.adapter_schedule(torch.tensor([[2, -1, 0], [2, 0, -1]]), 4)
    assert sched.num_tokens == 6 and sched.num_adapters == 4
    assert sched.order.tolist() == [1, 5, 2, 4, 0, 3]
    assert sched.starts.tolist() == [2, 4, 4, 6, 6]
    # Sorted ids need no order: segments are token ranges.
    sorted_sched = ops.adapter_schedule(torch.tensor([-1, 0, 0, 3]), 4)
    assert sorted_sched.order.numel() == 0 and sorted_sched.starts.tolist() == [1, 3, 3, 3, 4]


def test_triton_split_k_and_tiles(monkeypatch):
    """The atomic split-K shrink (a GPU's choice for decode) and the tile table, in the interpreter."""
    why = ml.BACKENDS["triton"].reasons(device=DEVICE, dtype=torch.float32)
    if why:
        pytest.skip("; ".join(why))
    from fastadapters.kernels import multi_lora as kml

    gen = torch.Generator().manual_seed(7)
    d_in, d_out = 70, 24
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(d_in, [d_out], [RANKS], torch.float32, gen)
    ids = torch.tensor([4, 1, -1, 4, 0, 5, 4, 3, 1, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]).to(DEVICE)
    sched = ops.adapter_schedule(ids, len(RANKS))
    tiles = kml.prepare(sched)
    bm = kml.block_m(ids.numel())
    real = [(a, blk) for a, blk in tiles.T.tolist() if a < len(RANKS)]
    counts = torch.bincount(ids[ids >= 0], minlength=len(RANKS)).tolist()
    assert real == [(a, blk) for a in range(len(RANKS)) for blk in range(math.ceil(counts[a] / bm))]
    monkeypatch.setattr(kml, "FORCE_SPLIT_K", 3)
    x = torch.randn(20, d_in, generator=gen).to(DEVICE)
    check_single("triton", torch.float32, x, w, b, bank_a, bank_b, RANKS, scales, ids)


@pytest.mark.parametrize("strategy", ["segments", "batched", "rows"])
@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("uniform", [False, True], ids=["mixed-ranks", "one-rank"])
def test_torch_strategies(monkeypatch, strategy, spread, uniform):
    """Every strategy of the torch backend, forced: per-adapter segments, the padded bmm groups (decode)
    and rows of one adapter each (prefill), with one rank signature (the rows path then takes the whole
    batch, base rows zero-filled) or several (rows gathered per signature)."""
    monkeypatch.setattr(torch_ml, "BATCHED_BELOW", 10**9 if strategy == "batched" else 0)
    monkeypatch.setattr(torch_ml, "ROWS_FROM_ADAPTERS", 1 if strategy == "rows" else 10**9)
    gen = torch.Generator().manual_seed(12)
    rows, d_in, d_out = 12, 24, 18
    ranks = [[4] * 6, [4] * 6] if uniform else [[4, 8, 4, 0, 8, 1], [4, 8, 4, 2, 0, 1]]
    weights, biases, bank_a, bank_bs, scales = make_bank(d_in, [d_out, d_out + 3], ranks, torch.float32, gen)
    row_ids = row_adapters(spread, rows, 6, gen)
    # Rows of 16 tokens are long enough for the rows path (rows x rank <= tokens); decode rows are not.
    for seq, ids in ((1, row_ids), (3, row_ids.sort().values), (16, row_ids.sort().values), (16, row_ids)):
        ids = ids[:, None].expand(rows, seq).to(DEVICE)
        x = torch.randn(rows, seq, d_in, generator=gen).to(DEVICE)
        with ops.use_backend("torch"):
            ys = ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, ids)
        expected = reference.multi_lora_linear_grouped(
            x, weights, biases, bank_a, bank_bs, ranks, scales, ids
        )
        for m, (y, e) in enumerate(zip(ys, expected)):
            assert_close(y, e, torch.float32, name=f"{strategy} {spread} seq {seq} member {m}")


# Rows of the base (-1) and of six adapters, unsorted; the NaN-isolation tests fill one adapter with NaN.
NAN_ROW_IDS = [-1, 2, 2, 0, -1, 0, 5, 2, -1, 1, 0, 3]


def _nan_fill(bank: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    bank = bank.clone()
    bank[start : start + rows] = float("nan")
    return bank


def _lora_nan_isolated(ranks, bad, seq, sort, backend):
    """multi_lora_linear_grouped with adapter `bad` NaN-filled: every row of another adapter (or of the
    base) is bit-identical to the clean call, and the rows of `bad` are NaN."""
    gen = torch.Generator().manual_seed(21)
    rows, d_in, d_outs = len(NAN_ROW_IDS), 24, [18, 21]
    weights, biases, bank_a, bank_bs, scales = make_bank(d_in, d_outs, ranks, torch.float32, gen)
    a_off, a_rows, _, b_off = ml.host_meta(tuple(r for member in ranks for r in member), len(ranks))
    dirty_a = _nan_fill(bank_a, a_off[bad], a_rows[bad])
    dirty_bs = [_nan_fill(b, b_off[m][bad], ranks[m][bad]) for m, b in enumerate(bank_bs)]
    row_ids = torch.tensor(NAN_ROW_IDS)
    row_ids = row_ids.sort().values if sort else row_ids
    ids = row_ids[:, None].expand(rows, seq).to(DEVICE)
    x = torch.randn(rows, seq, d_in, generator=gen).to(DEVICE)
    with ops.use_backend(backend):
        clean = ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, ids)
        dirty = ops.multi_lora_linear_grouped(x, weights, biases, dirty_a, dirty_bs, ranks, scales, ids)
    mine = (row_ids == bad).to(DEVICE)
    for m, (c, d) in enumerate(zip(clean, dirty)):
        assert not c.isnan().any()
        assert d[mine].isnan().all() or not ranks[m][bad], f"member {m}: adapter {bad}'s rows not NaN"
        assert torch.equal(d[~mine], c[~mine]), f"member {m}: a row of another adapter changed"


@pytest.mark.parametrize("strategy", ["segments", "batched", "rows"])
@pytest.mark.parametrize("uniform", [False, True], ids=["mixed-ranks", "one-rank"])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_torch_strategies_nan_adapter_changes_no_other_row(monkeypatch, strategy, uniform, bad):
    """Each torch strategy, forced: a NaN-filled adapter changes no other row. Other rows were multiplied
    by 0 (base rows riding in a bucket's batch; padded decode slots pointing at token 0), and NaN x 0 is
    NaN; they are zero-filled now."""
    monkeypatch.setattr(torch_ml, "BATCHED_BELOW", 10**9 if strategy == "batched" else 0)
    monkeypatch.setattr(torch_ml, "ROWS_FROM_ADAPTERS", 1 if strategy == "rows" else 10**9)
    ranks = [[4] * 6, [4] * 6] if uniform else [[4, 8, 4, 0, 8, 1], [4, 8, 4, 2, 0, 1]]
    for seq, sort in ((1, False), (3, True), (16, True), (16, False)):
        _lora_nan_isolated(ranks, bad, seq, sort, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_adapter_changes_no_other_row(backend):
    ranks = [[4, 8, 4, 0, 8, 1], [4, 8, 4, 2, 0, 1]]
    for seq, sort in ((1, False), (5, True)):
        _lora_nan_isolated(ranks, 0, seq, sort, backend)


@pytest.mark.parametrize("spread", ["uniform", "identical"])
def test_torch_rows_strategy_bottleneck(monkeypatch, spread):
    monkeypatch.setattr(torch_ml, "ROWS_FROM_ADAPTERS", 1)
    gen = torch.Generator().manual_seed(16)
    rows, seq, d = 9, 40, 20
    down, up, scales = make_bottleneck_bank(d, d, torch.float32, gen)
    ids = row_adapters(spread, rows, len(BN_SIZES), gen).sort().values[:, None].expand(rows, seq)
    h = torch.randn(rows, seq, d, generator=gen)
    with ops.use_backend("torch"):
        out = ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, ids)
    expected = reference.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, ids)
    assert_close(out, expected, torch.float32, name=spread)


def test_schedule_row_len():
    assert ops.adapter_schedule(torch.tensor([[1, 1, 1], [0, 0, 0]]), 2).row_len == 3
    assert ops.adapter_schedule(torch.tensor([[1, 0, 1], [0, 0, 0]]), 2).row_len == 0
    assert ops.adapter_schedule(torch.tensor([1, 1, 0]), 2).row_len == 0


def test_torch_backend_single_thread_toggle_restores_threads():
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(8)
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(16, [16], [RANKS], torch.float32, gen)
    ids = torch.arange(-1, len(RANKS)).repeat(3)
    with ops.use_backend("torch"):
        ops.multi_lora_linear(torch.randn(ids.numel(), 16), w, b, bank_a, bank_b, RANKS, scales, ids)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_and_schema(backend):
    """The custom op's fake implementation agrees with the real one (torch.compile sees one node)."""
    gen = torch.Generator().manual_seed(9)
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(8, [5], [[2, 3]], torch.float32, gen)
    ids = torch.tensor([1, -1, 0]).to(DEVICE)
    sched = ops.adapter_schedule(ids, 2)
    x = torch.randn(3, 8, device=DEVICE)
    with ops.use_backend(backend):
        tiles = ml.BACKENDS[backend].module().prepare(sched)
        args = (
            x,
            [w],
            [b],
            bank_a,
            [bank_b],
            [2, 3],
            scales,
            sched.adapter_ids,
            sched.order,
            sched.starts,
            tiles,
            backend,
        )
        torch.library.opcheck(
            ml.MULTI_LORA_LINEAR.custom, args, test_utils=("test_schema", "test_faketensor")
        )


# --------------------------------------------------------------------------------------------- bottleneck

BN_SIZES = [3, 16, 0, 8, 40, 5]
BN_ACTS = ["tanh", "relu", "gelu", "silu", "sigmoid", "tanh"]
BN_BACKENDS = _backend_params(ml.BOTTLENECK_BACKENDS)


def make_bottleneck_bank(d_in, d_out, dtype, gen):
    n = len(BN_SIZES)
    down = torch.randn(sum(BN_SIZES), d_in, generator=gen) / math.sqrt(d_in)
    up = torch.randn(sum(BN_SIZES), d_out, generator=gen) / math.sqrt(max(BN_SIZES))
    scales = [float(torch.empty(()).uniform_(-2, 2, generator=gen)) for _ in range(n)]
    return down.to(DEVICE, dtype), up.to(DEVICE, dtype), scales


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["series", "parallel"])
def test_bottleneck_matches_reference(backend, dtype, form):
    """Per-row bottleneck adapters, every activation, sizes 0 (absent) to 40, series and parallel."""
    gen = torch.Generator().manual_seed(13)
    rows, seq, d_in = 7, 3, 33
    d_out = d_in if form == "series" else 26
    down, up, scales = make_bottleneck_bank(d_in, d_out, dtype, gen)
    h = torch.randn(rows, seq, d_in, generator=gen).to(DEVICE, dtype)
    residual = None if form == "series" else torch.randn(rows, seq, d_out, generator=gen).to(DEVICE, dtype)
    ids = torch.randint(-1, len(BN_SIZES), (rows, seq), generator=gen).to(DEVICE)
    with ops.use_backend(backend):
        out = ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, ids, residual=residual)
    expected = reference.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, ids, residual)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, name=f"{form} out")


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("spread", SPREADS)
def test_bottleneck_spreads_and_decode(backend, spread):
    gen = torch.Generator().manual_seed(14)
    rows, d = 10, 21
    down, up, scales = make_bottleneck_bank(d, d, torch.float32, gen)
    row_ids = row_adapters(spread, rows, len(BN_SIZES), gen).sort().values
    for seq in (1, 4):  # decode (one token per row) and prefill, one schedule reused by two calls
        sched = ops.adapter_schedule(row_ids[:, None].expand(rows, seq).to(DEVICE), len(BN_SIZES))
        for _ in range(2):
            h = torch.randn(rows, seq, d, generator=gen).to(DEVICE)
            with ops.use_backend(backend):
                out = ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, sched)
            expected = reference.multi_bottleneck_adapter(
                h, down, up, BN_SIZES, scales, BN_ACTS, sched.adapter_ids
            )
            assert_close(out, expected, torch.float32, name=f"{spread} seq {seq}")


@pytest.mark.parametrize("backend", BN_BACKENDS)
@pytest.mark.parametrize("strategy", ["default", "batched", "rows"])
def test_bottleneck_nan_adapter_changes_no_other_row(monkeypatch, backend, strategy):
    """multi_bottleneck_adapter with one adapter's D and U NaN-filled: other rows bit-identical."""
    if strategy != "default":
        if backend != "torch":
            pytest.skip("strategies are the torch backend's")
        monkeypatch.setattr(torch_ml, "BATCHED_BELOW", 10**9 if strategy == "batched" else 0)
        monkeypatch.setattr(torch_ml, "ROWS_FROM_ADAPTERS", 1 if strategy == "rows" else 10**9)
    gen = torch.Generator().manual_seed(22)
    d = 20
    down, up, scales = make_bottleneck_bank(d, d, torch.float32, gen)
    row_ids = torch.tensor(NAN_ROW_IDS)
    seqs = (1, 12) if backend != "triton" else (1, 4)
    for bad, seq in [(bad, seq) for bad in (0, 1) for seq in seqs]:
        sorted_ids = row_ids.sort().values
        ids = sorted_ids[:, None].expand(len(row_ids), seq).to(DEVICE)
        h = torch.randn(len(row_ids), seq, d, generator=gen).to(DEVICE)
        start = sum(BN_SIZES[:bad])
        with ops.use_backend(backend):
            clean = ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, ids)
            dirty = ops.multi_bottleneck_adapter(
                h, _nan_fill(down, start, BN_SIZES[bad]), _nan_fill(up, start, BN_SIZES[bad]), BN_SIZES,
                scales, BN_ACTS, ids,
            )  # fmt: skip
        mine = (sorted_ids == bad).to(DEVICE)
        assert not clean.isnan().any()
        assert dirty[mine].isnan().all()
        assert torch.equal(dirty[~mine], clean[~mine]), f"adapter {bad} NaN, seq {seq}: another row changed"


def test_bottleneck_bad_input():
    gen = torch.Generator().manual_seed(15)
    down, up, scales = make_bottleneck_bank(6, 6, torch.float32, gen)
    h, ids = torch.randn(2, 6, device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    args = (h, down, up, BN_SIZES, scales, BN_ACTS, ids)
    ops.multi_bottleneck_adapter(*args)
    with pytest.raises(ValueError, match="activations must be names"):
        ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, ["tanh"] * 5 + ["swish"], ids)
    with pytest.raises(ValueError, match="one name per adapter"):
        ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS[:2], ids)
    for acts in (None, "tanh", 3):
        with pytest.raises(TypeError, match=r"^activations must be a list of 6 activation names .*, got "):
            ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, acts, ids)
    empty = torch.randn(2, 0, device=DEVICE)
    with pytest.raises(ValueError, match=r"^h must have a last dimension \(d_in\) >= 1"):
        ops.multi_bottleneck_adapter(empty, down[:, :0], up[:, :0], BN_SIZES, scales, BN_ACTS, ids)
    with pytest.raises(ValueError, match="bank_down must have shape"):
        ops.multi_bottleneck_adapter(h, down[1:], up, BN_SIZES, scales, BN_ACTS, ids)
    with pytest.raises(ValueError, match="series form"):
        ops.multi_bottleneck_adapter(h, down, up[:, :5], BN_SIZES, scales, BN_ACTS, ids)
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.multi_bottleneck_adapter(*args, residual=torch.randn(3, 6, device=DEVICE))
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        ops.multi_bottleneck_adapter(h, down, up, BN_SIZES, scales, BN_ACTS, torch.tensor([0, 6]))
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.multi_bottleneck_adapter(h.requires_grad_(), down, up, BN_SIZES, scales, BN_ACTS, ids)


# --------------------------------------------------------------------------------------------- errors


def _good():
    gen = torch.Generator().manual_seed(10)
    (w,), (b,), bank_a, (bank_b,), (scales,) = make_bank(6, [4], [[2, 3]], torch.float32, gen)
    return dict(
        x=torch.randn(3, 6, device=DEVICE), weight=w, bias=b, bank_a=bank_a, bank_b=bank_b, ranks=[2, 3],
        scales=scales, adapter_ids=torch.tensor([0, 1, -1], device=DEVICE),
    )  # fmt: skip


BAD = {
    "id too large": (dict(adapter_ids=torch.tensor([0, 2, -1])), ValueError, "adapter_ids must be in"),
    "id below -1": (dict(adapter_ids=torch.tensor([0, -2, -1])), ValueError, "adapter_ids must be in"),
    "float ids": (dict(adapter_ids=torch.tensor([0.0, 1.0, 0.0])), TypeError, "integer tensor"),
    "ids shape": (dict(adapter_ids=torch.tensor([0, 1])), ValueError, "leading shape"),
    "negative rank": (dict(ranks=[-1, 6]), ValueError, "ints >= 0"),
    "ranks sum": (dict(ranks=[2, 2]), ValueError, "bank_a must have shape"),
    "scales length": (dict(scales=[1.0]), ValueError, "one value per adapter"),
    "scale nan": (dict(scales=[1.0, float("nan")]), TypeError, "scales"),
    "bank_b width": (dict(bank_b=torch.randn(5, 3)), ValueError, "bank_b must have shape"),
    "bank_a dtype": (
        dict(bank_a=torch.randn(5, 6, dtype=torch.float64)),
        TypeError,
        "bank_a must have x's dtype torch.float32",
    ),
    "bank_a half": (dict(bank_a=torch.randn(5, 6).half()), TypeError, "bank_a must have x's dtype"),
    "weight d_in": (dict(weight=torch.randn(4, 5)), ValueError, "weight must have shape"),
    "bias shape": (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    "x int": (dict(x=torch.ones(3, 6, dtype=torch.long)), TypeError, "x must be float32"),
    "x d_in 0": (dict(x=torch.randn(3, 0)), ValueError, r"x must have a last dimension \(d_in\) >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case):
    change, exc, match = BAD[case]
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=match):
        ops.multi_lora_linear(**args)


def test_schedule_mismatch_and_grad_errors():
    args = _good()
    with pytest.raises(ValueError, match="schedule for 3 adapters"):
        ops.multi_lora_linear(**{**args, "adapter_ids": ops.adapter_schedule(torch.tensor([0, 1, 2]), 3)})
    with pytest.raises(ValueError, match="has 2 tokens"):
        ops.multi_lora_linear(**{**args, "adapter_ids": ops.adapter_schedule(torch.tensor([0, 1]), 2)})
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.multi_lora_linear(**{**args, "x": args["x"].requires_grad_()})
    with torch.no_grad():  # the same call without grad is fine
        ops.multi_lora_linear(**args)


def test_grouped_bad_input():
    gen = torch.Generator().manual_seed(11)
    ranks = [[2, 1], [0, 3]]
    weights, biases, bank_a, bank_bs, scales = make_bank(6, [4, 5], ranks, torch.float32, gen)
    ids = torch.tensor([0, 1]).to(DEVICE)
    x = torch.randn(2, 6, device=DEVICE)
    with pytest.raises(ValueError, match="one sequence per member"):
        ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks[:1], scales, ids)
    with pytest.raises(ValueError, match="same adapters"):
        ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, [[2, 1], [0, 3, 1]], scales, ids)
    with pytest.raises(ValueError, match=r"bank_b\[1\] must have shape"):
        ops.multi_lora_linear_grouped(
            x, weights, biases, bank_a, [bank_bs[0], bank_bs[0]], ranks, scales, ids
        )
    with pytest.raises(ValueError, match="non-empty lists of one length"):
        ops.multi_lora_linear_grouped(x, weights, biases[:1], bank_a, bank_bs, ranks, scales, ids)


def test_tolerance_table_covers_dtypes():
    assert all(d in TOLERANCES for d in DTYPES)


def test_float64_runs_on_the_torch_backends():
    """float64 (PEFT runs it; the engine's exactness tests use it) is the torch backends' alone."""
    ops_names = ("lora_linear", "bottleneck_adapter", "multi_lora_linear", "multi_bottleneck_adapter")
    for op in (*ops_names, "prefix_attention"):
        assert ops.backend_for(op, dtype=torch.float64) == "torch", op
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="compiled kernels take|not built"):
        ops.backend_for("lora_linear", dtype=torch.float64)
