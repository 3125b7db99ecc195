"""Multi-LoRA linear (serving): one batch, 16 adapters, one call per layer vs PEFT's adapter_names loop.

One call = y = x Wᵀ + b + s_a · (x A_aᵀ) B_aᵀ for every token, a = its row's adapter (inference, no grad).
CPU shapes (issue 5): a 256-wide layer (q_proj of the tiny Llama), 16 adapters of rank 16, rows spread
uniformly over the adapters: prefill 32 rows × 64 tokens, decode 32 rows × 1 token; fp32.
GPU shapes: a 4096-wide layer, bf16, 16 and 64 adapters with ranks 8/16/32/64 mixed, prefill 32 × 128 and
decode 64 × 1.
Providers: "base" (the layer alone: x Wᵀ + b), "peft" (a peft LoRA Linear holding the adapters, called
with adapter_names: its per-adapter Python loop), "reference" (fastadapters.reference.multi_lora_linear)
and "fastadapters-<backend>" for every backend that runs here (the bank's ids are sorted by row, as
AdapterBank passes them).
extra_info: tokens, adapters, rank (the largest), bytes (x, W, b and y once plus the A/B of the adapters
present: the traffic a fused kernel cannot avoid, for GB/s against the copy bandwidth) and flops.
The per-row bottleneck op (multi_bottleneck_adapter) is measured the same way below (test_multi_bottleneck).
"""

import pytest
import torch
from torch import nn

from bench.common import device, fastadapters_providers, forced, on_gpu, pick, record
from fastadapters import ops, reference
from fastadapters.ops.multi_lora import BACKENDS, BOTTLENECK_BACKENDS

MIXED = (8, 16, 32, 64)
# (rows, tokens per row, d, adapters, ranks cycled over the adapters)
SHAPES = pick(
    [(32, 64, 256, 16, (16,)), (32, 1, 256, 16, (16,))],
    [(4, 3, 32, 4, (2, 4))],
    gpu=[(32, 128, 4096, 16, MIXED), (64, 1, 4096, 16, MIXED), (64, 1, 4096, 64, MIXED)],
)  # fmt: skip
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
PROVIDERS = ["base", "peft", "reference", *fastadapters_providers(BACKENDS, dtype=DTYPE)]


def shape_name(s) -> str:
    rows, seq, d, n, ranks = s
    kind = "decode" if seq == 1 else "prefill"
    r = "r" + "/".join(map(str, ranks))
    return f"{kind} B{rows} S{seq} d{d} {n}x{r} {str(DTYPE).removeprefix('torch.')}"


def make_bank(s):
    """(x, layer, bank_a, bank_b, ranks, scales, row ids); rows spread uniformly, sorted by adapter."""
    rows, seq, d, n, cycle = s
    gen = torch.Generator().manual_seed(0)
    ranks = [cycle[a % len(cycle)] for a in range(n)]
    scales = [2.0] * n
    layer = nn.Linear(d, d).to(device(), DTYPE).requires_grad_(False)
    bank_a = (torch.randn(sum(ranks), d, generator=gen) / d**0.5).to(device(), DTYPE)
    bank_b = (torch.randn(sum(ranks), d, generator=gen) * 0.05).to(device(), DTYPE)
    x = torch.randn(rows, seq, d, generator=gen).to(device(), DTYPE)
    row_ids = torch.arange(rows) * n // rows  # each adapter gets rows / n rows, in order
    return x, layer, bank_a, bank_b, ranks, scales, row_ids


def peft_layer(layer, bank_a, bank_b, ranks, scales):
    """A peft LoRA Linear over `layer` holding the bank's adapters as a0, a1, …"""
    import peft

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    offs = [sum(ranks[:a]) for a in range(len(ranks))]
    model = None
    for a, (r, off) in enumerate(zip(ranks, offs)):
        cfg = peft.LoraConfig(r=r, lora_alpha=scales[a] * r, target_modules=["proj"], lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(Holder(), cfg, adapter_name=f"a{a}")
        else:
            model.add_adapter(f"a{a}", cfg)
        lora = model.base_model.model.proj
        with torch.no_grad():
            lora.lora_A[f"a{a}"].weight.copy_(bank_a[off : off + r])
            lora.lora_B[f"a{a}"].weight.copy_(bank_b[off : off + r].T)
    return model.to(device(), DTYPE).eval()


def traffic(s, ranks, x, layer) -> tuple[int, int]:
    """(bytes, flops) of one call: x, W, b, y once and the present adapters' A and B."""
    rows, seq, d, n, _ = s
    elt = x.element_size()
    present = sorted({int(a) for a in torch.arange(rows) * n // rows})
    lora_rows = sum(ranks[a] for a in present)
    tokens = rows * seq
    nbytes = elt * (x.numel() + layer.weight.numel() + layer.bias.numel() + tokens * d + lora_rows * 2 * d)
    per_token_rank = sum(ranks[a] for a in (torch.arange(rows) * n // rows).tolist()) * seq
    flops = 2 * tokens * d * d + 2 * per_token_rank * 2 * d
    return nbytes, flops


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES, ids=shape_name)
def test_multi_lora(benchmark, s, provider):
    rows, seq, d, n, _ = s
    x, layer, bank_a, bank_b, ranks, scales, row_ids = make_bank(s)
    ids = row_ids[:, None].expand(rows, seq).to(device())
    if provider == "base":
        call = lambda: layer(x)
    elif provider == "peft":
        model = peft_layer(layer, bank_a, bank_b, ranks, scales)
        names = [f"a{a}" for a in row_ids.tolist()]
        call = lambda: model(x, adapter_names=names)
    elif provider == "reference":
        call = lambda: reference.multi_lora_linear(
            x, layer.weight, layer.bias, bank_a, bank_b, ranks, scales, ids
        )
    else:
        # The bank builds one schedule per batch and every layer reuses it.
        sched = ops.adapter_schedule(ids, n)
        call = lambda: ops.multi_lora_linear(
            x, layer.weight, layer.bias, bank_a, bank_b, ranks, scales, sched
        )
    nbytes, flops = traffic(s, ranks, x, layer)
    with forced(provider), torch.no_grad():
        out = call()  # warm-up (Triton compilation, schedule preparation)
        record(
            benchmark,
            op="multi_lora_linear",
            provider=provider,
            shape=shape_name(s),
            tokens=rows * seq,
            adapters=n,
            rank=max(ranks),
            bytes=nbytes,
            flops=flops,
            dtype=str(DTYPE).removeprefix("torch."),
        )
        out = benchmark(call)
    assert out.shape == (rows, seq, d) and torch.isfinite(out.float()).all()
    if provider not in ("base", "reference"):
        expected = reference.multi_lora_linear(
            x, layer.weight, layer.bias, bank_a, bank_b, ranks, scales, ids
        )
        tol = 1e-3 if DTYPE == torch.float32 else 6e-2
        torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------- bottleneck
# Per-row bottleneck adapters (serving series/parallel adapters): out = h + s_a · f(h D_aᵀ) U_aᵀ per row.
# Providers: "eager" (a loop over the adapters present: mask the rows, down, activation, up, add; no
# library runs mixed bottleneck batches), "reference" and "fastadapters-<backend>".
BN_SHAPES = pick(
    [(32, 64, 256, 16, 64), (32, 1, 256, 16, 64)],
    [(4, 3, 32, 4, 8)],
    gpu=[(32, 128, 4096, 16, 256), (64, 1, 4096, 16, 256)],
)
BN_PROVIDERS = [
    "eager",
    "reference",
    *fastadapters_providers(BOTTLENECK_BACKENDS, dtype=DTYPE),
]


def bn_name(s) -> str:
    rows, seq, d, n, b = s
    kind = "decode" if seq == 1 else "prefill"
    return f"{kind} B{rows} S{seq} d{d} {n}x b{b} tanh {str(DTYPE).removeprefix('torch.')}"


@pytest.mark.parametrize("provider", BN_PROVIDERS)
@pytest.mark.parametrize("s", BN_SHAPES, ids=bn_name)
def test_multi_bottleneck(benchmark, s, provider):
    rows, seq, d, n, b = s
    gen = torch.Generator().manual_seed(0)
    sizes, scales, acts = [b] * n, [1.0] * n, ["tanh"] * n
    down = (torch.randn(n * b, d, generator=gen) / d**0.5).to(device(), DTYPE)
    up = (torch.randn(n * b, d, generator=gen) * 0.05).to(device(), DTYPE)
    h = torch.randn(rows, seq, d, generator=gen).to(device(), DTYPE)
    row_ids = torch.arange(rows) * n // rows
    ids = row_ids[:, None].expand(rows, seq).to(device())
    if provider == "eager":
        token_ids = ids.reshape(-1)

        def call():
            out = h.reshape(-1, d).clone()
            x = h.reshape(-1, d)
            for a in token_ids.unique().tolist():
                rows_a = token_ids == a
                z = torch.tanh(x[rows_a] @ down[a * b : (a + 1) * b].T)
                out[rows_a] += z @ up[a * b : (a + 1) * b]
            return out.view(rows, seq, d)

    elif provider == "reference":
        call = lambda: reference.multi_bottleneck_adapter(h, down, up, sizes, scales, acts, ids)
    else:
        sched = ops.adapter_schedule(ids, n)
        call = lambda: ops.multi_bottleneck_adapter(h, down, up, sizes, scales, acts, sched)
    elt = h.element_size()
    tokens = rows * seq
    with forced(provider), torch.no_grad():
        out = call()
        record(
            benchmark,
            op="multi_bottleneck_adapter",
            provider=provider,
            shape=bn_name(s),
            tokens=tokens,
            adapters=n,
            bytes=elt * (2 * tokens * d + 2 * n * b * d),
            flops=2 * tokens * 2 * b * d,
            dtype=str(DTYPE).removeprefix("torch."),
        )
        out = benchmark(call)
    expected = reference.multi_bottleneck_adapter(h, down, up, sizes, scales, acts, ids)
    tol = 1e-3 if DTYPE == torch.float32 else 6e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
