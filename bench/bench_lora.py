"""LoRA linear layer forward+backward: fastadapters' backends vs a real peft LoraLayer vs the frozen layer.

One call = y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ and y.backward(g), with gradients for x, A and B (W and b
frozen, as in fine-tuning). Shapes (issue 2): d=1024, N=2048 tokens, r=16, fp32 on the CPU, without and
with dropout 0.05, plus an R-vs-rank sweep; on a GPU bf16, d=4096, N=4096.
Providers: "frozen" (the nn.Linear alone, x requiring grad: the floor R is measured against), "peft" (a
peft lora.Linear built by get_peft_model, adapter in the base dtype), "reference"
(fastadapters.reference.lora_linear, fp32 math) and "fastadapters-<backend>" for every backend that
runs here. R = t(provider) / t(frozen) per group; the FLOP floor is 1 + 3r/d.
extra_info: saved_bytes (saved for backward, weights excluded, x included), rank, dropout, tokens, and
flops / bytes (the work of one call: 4·N·d_in·d_out + 12·N·r·d flops; x, y, dy, dx and W once each).
"""

import pytest
import torch
from torch import nn

from bench.common import device, fastadapters_providers, forced, on_gpu, pick, record, saved_bytes
from fastadapters import ops, reference
from fastadapters.ops.lora import BACKENDS

DTYPE = torch.bfloat16 if on_gpu() else torch.float32
# (N tokens, d, rank, dropout)
SHAPES = pick(
    [(2048, 1024, r, 0.0) for r in (8, 16, 32, 64)] + [(2048, 1024, 16, 0.05)],
    [(64, 48, 4, 0.0), (64, 48, 4, 0.05)],
    gpu=[(4096, 4096, r, 0.0) for r in (8, 16, 64)] + [(4096, 4096, 16, 0.05)],
)
PROVIDERS = ["frozen", "peft", "reference", *fastadapters_providers(BACKENDS, dtype=DTYPE)]


def shape_name(s) -> str:
    n, d, r, p = s
    return f"d{d} N{n} r{r} p{p:g} {str(DTYPE).removeprefix('torch.')}"


class _One(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base


def peft_layer(base: nn.Linear, rank: int, dropout: float) -> nn.Module:
    """peft's LoRA layer around `base`, built as users build it (get_peft_model); adapter in base dtype."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(_One(base), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # non-zero B, so the adapter does real work
    return layer.train()


def work(n: int, d: int, rank: int) -> tuple[int, int]:
    """(flops, bytes) of one forward+backward call (see the module docstring)."""
    size = torch.finfo(DTYPE).bits // 8
    return 4 * n * d * d + 12 * n * rank * d, size * (4 * n * d + d * d)


def make_call(provider: str, s):
    """(call, forward, weights): call() runs forward+backward once; weights are left out of saved bytes."""
    n, d, rank, p = s
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(device(), DTYPE).requires_grad_(False)
    x = torch.randn(n, d, device=device(), dtype=DTYPE, requires_grad=True)
    g = torch.randn(n, d, device=device(), dtype=DTYPE)
    scale = 2.0  # lora_alpha = 2·r
    if provider == "peft":
        layer = peft_layer(base, rank, p)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        forward = lambda: layer(x)
    else:
        a = (torch.randn(rank, d, device=device(), dtype=DTYPE) / d**0.5).requires_grad_()
        b = (torch.randn(d, rank, device=device(), dtype=DTYPE) * 0.02).requires_grad_()
        if provider == "frozen":
            forward = lambda: base(x)
        elif provider == "reference":

            def forward():
                keep = None
                if p > 0:
                    keep = (torch.rand_like(x, dtype=torch.float32) >= p).to(DTYPE) / (1 - p)
                return reference.lora_linear(x, base.weight, base.bias, a, b, scale, keep)

        else:
            forward = lambda: ops.lora_linear(x, base.weight, base.bias, a, b, scale, p, training=True)

    def call():
        for t in (x, a, b):
            t.grad = None
        y = forward()
        y.backward(g)
        return y

    return call, forward, [base.weight, base.bias, a, b]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES, ids=shape_name)
def test_lora_fwd_bwd(benchmark, s, provider):
    n, d, rank, p = s
    with forced(provider):
        call, forward, weights = make_call(provider, s)
        call()  # warm-up: compilation and autotuning stay out of the timed rounds
        flops, nbytes = work(n, d, 0 if provider == "frozen" else rank)
        record(
            benchmark,
            op="lora",
            provider=provider,
            shape=shape_name(s),
            saved_bytes=saved_bytes(forward, exclude=weights),
            rank=rank,
            dropout=p,
            tokens=n,
            flops=flops,
            bytes=nbytes,
            dtype=str(DTYPE).removeprefix("torch."),
        )
        y = benchmark(call)
    assert torch.isfinite(y.float()).all()
