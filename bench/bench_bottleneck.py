"""Bottleneck adapter forward+backward: the fused op vs the eager module vs the reference.

One call = out = h + s · up(f(down(h))) (the series form, tanh, scale 1.0) and out.backward(g), with
gradients for h, down and up. Shape (issue 3): N=2048 tokens, d=1024, bottleneck 256; fp32 on the CPU,
bf16 on a GPU (plus a 4096-wide layer there).
Providers: "eager" (nn.Linear down, nn.Tanh, nn.Linear up, scale, add: how AdapterHub's `adapters`
computes it), "reference" (fastadapters.reference.bottleneck_adapter), "fastadapters-<backend>" for
every backend of the op that runs here, and "gemms": the floor, the six GEMMs of forward+backward alone
(h Dᵀ, t Uᵀ, g U, gᵀ t, dt D, dtᵀ h) on preallocated tensors, with no activation, residual or autograd.
extra_info: saved_bytes (saved for backward, the weights excluded, h included: the adapter is what keeps
it alive in a model), tokens, flops (the 6 GEMMs of forward+backward), bottleneck.
"""

import pytest
import torch
from torch import nn

from bench.common import device, fastadapters_providers, forced, on_gpu, pick, record, saved_bytes
from fastadapters import ops, reference
from fastadapters.ops.bottleneck import BACKENDS

ACTIVATION = "tanh"
SCALE = 1.0
SHAPES = pick([(2048, 1024, 256)], [(64, 32, 8)], gpu=[(2048, 1024, 256), (8192, 4096, 256)])
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
PROVIDERS = ["gemms", "eager", "reference", *fastadapters_providers(BACKENDS, dtype=DTYPE, bottleneck=256)]


class EagerAdapter(nn.Module):
    """The naive module: down Linear, activation module, up Linear, scale, residual add."""

    def __init__(self, d: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(d, bottleneck, bias=False)
        self.act = nn.Tanh()
        self.up = nn.Linear(bottleneck, d, bias=False)
        self.scale = SCALE

    def forward(self, h):
        return h + self.up(self.act(self.down(h))) * self.scale


def shape_name(s) -> str:
    n, d, b = s
    return f"N{n} d{d} b{b} {ACTIVATION} {str(DTYPE).removeprefix('torch.')}"


def make_call(provider: str, s):
    """(call, tensors that need grads cleared, weights): call() runs forward and backward once."""
    n, d, b = s
    torch.manual_seed(0)
    eager = EagerAdapter(d, b).to(device(), DTYPE)
    down, up = eager.down.weight, eager.up.weight
    h = torch.randn(n, d, device=device(), dtype=DTYPE, requires_grad=True)
    g = torch.randn(n, d, device=device(), dtype=DTYPE)
    if provider == "gemms":
        return _gemms(h.detach(), down.detach(), up.detach(), g), None, []
    if provider == "eager":
        forward = lambda: eager(h)
    elif provider == "reference":
        forward = lambda: reference.bottleneck_adapter(h, down, up, SCALE, ACTIVATION)
    else:
        forward = lambda: ops.bottleneck_adapter(h, down, up, SCALE, ACTIVATION)

    def call():
        for t in (h, down, up):
            t.grad = None
        out = forward()
        out.backward(g)
        return out

    return call, forward, [down, up]


def _gemms(h, down, up, g):
    """The floor: forward+backward's six GEMMs, nothing else (torch.mm into preallocated outputs)."""
    t, out = h.new_empty(h.shape[0], down.shape[0]), torch.empty_like(h)
    dt, dh = torch.empty_like(t), torch.empty_like(h)
    d_down, d_up = torch.empty_like(down), torch.empty_like(up)

    def call():
        torch.mm(h, down.T, out=t)
        torch.mm(t, up.T, out=out)
        torch.mm(g, up, out=dt)
        torch.mm(g.T, t, out=d_up)
        torch.mm(dt, down, out=dh)
        torch.mm(dt.T, h, out=d_down)
        return out

    return call


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES, ids=shape_name)
def test_bottleneck_fwd_bwd(benchmark, s, provider):
    n, d, b = s
    with forced(provider):
        call, forward, weights = make_call(provider, s)
        call()  # warm-up: autotuning and compilation stay out of the timed rounds
        saved = None if forward is None else saved_bytes(forward, exclude=weights)
        record(
            benchmark,
            op="bottleneck_adapter",
            provider=provider,
            shape=shape_name(s),
            tokens=n,
            saved_bytes=saved,
            flops=6 * 2 * n * d * b,
            bottleneck=b,
            dtype=str(DTYPE).removeprefix("torch."),
        )
        out = benchmark(call)
    assert torch.isfinite(out.float()).all()
