"""Prefix attention: fastadapters' op vs the PEFT way (concatenate the prefix per row, then SDPA with an
explicit mask), for training (forward + backward) and for one decode step over a KV cache.

Training call: out = attention over [prefix; keys] (causal, every other row left-padded by 1/8 of S),
then out.backward(g) with gradients for q, k, v and the shared prefix. Decode call: one query per row
against a cache of S keys (forward only). Shapes (issue 4): B=8, S=512, P in {10, 64}, H=8, D=64, fp32 on
the CPU; on a GPU bf16, the same plus B=8, S=2048, H=32, D=128 (LLaMA-7B attention).
Providers: "peft" (torch.cat of the expanded prefix with k and v, a [B, 1, S, P+S] bool mask, SDPA) and
"fastadapters-<backend>" for every backend of the op that runs here.
extra_info: saved_bytes (saved for backward; q, k, v and the prefix excluded: they exist anyway),
tokens, flops (QKᵀ and PV; causal halves the sequence part; backward counted as 2.5× forward), bytes
(decode: K, V and prefix read once).
"""

import pytest
import torch
import torch.nn.functional as F

from bench.common import device, fastadapters_providers, forced, on_gpu, pick, record, saved_bytes
from fastadapters import ops
from fastadapters.ops.prefix_attention import BACKENDS

DTYPE = torch.bfloat16 if on_gpu() else torch.float32
CPU_SHAPES = [dict(B=8, S=512, P=10, H=8, D=64), dict(B=8, S=512, P=64, H=8, D=64)]
GPU_SHAPES = CPU_SHAPES + [dict(B=8, S=2048, P=10, H=32, D=128), dict(B=8, S=2048, P=64, H=32, D=128)]
SMOKE_SHAPES = [dict(B=2, S=24, P=3, H=2, D=16)]
SHAPES = pick(CPU_SHAPES, SMOKE_SHAPES, gpu=GPU_SHAPES)
PROVIDERS = ["peft", *fastadapters_providers(BACKENDS, dtype=DTYPE, head_dim=64)]


def shape_name(s: dict) -> str:
    return f"B{s['B']} S{s['S']} P{s['P']} H{s['H']} D{s['D']} {str(DTYPE).removeprefix('torch.')}"


def padding_mask(B: int, S: int) -> torch.Tensor:
    """[B, S] bool: every other row left-padded by S // 8."""
    mask = torch.ones(B, S, dtype=torch.bool, device=device())
    mask[1::2, : S // 8] = False
    return mask


def peft_attention(q, k, v, prefix_k, prefix_v, mask, causal: bool):
    """What PEFT's prefix tuning amounts to: the prefix copied into every row's keys and values, and an
    explicit [B, 1, S, P + S_kv] mask (prefix visible, causal offset by P, padding)."""
    B, _, S, _ = q.shape
    P, S_kv = prefix_k.shape[1], k.shape[2]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), mask], dim=1)[:, None, None, :]
    if causal:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(P + S_kv, device=q.device)[None, :]
        visible = visible & (j <= i + P + S_kv - S)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def hf_layout(*shape, gen, grad=False):
    """[B, H, S, D] viewed from [B, S, H, D] memory: how transformers hands q, k, v (and the output
    gradient) to an attention function."""
    B, H, S, D = shape
    t = torch.randn(B, S, H, D, generator=gen, device=device(), dtype=DTYPE).transpose(1, 2)
    return t.requires_grad_(grad)


def inputs(s: dict, S_q: int, grad: bool):
    gen = torch.Generator(device=device()).manual_seed(0)
    B, S, P, H, D = s["B"], s["S"], s["P"], s["H"], s["D"]
    prefix = [
        torch.randn(H, P, D, generator=gen, device=device(), dtype=DTYPE).requires_grad_(grad) for _ in "kv"
    ]
    q = hf_layout(B, H, S_q, D, gen=gen, grad=grad)
    return q, hf_layout(B, H, S, D, gen=gen, grad=grad), hf_layout(B, H, S, D, gen=gen, grad=grad), *prefix


def attention_fn(provider: str):
    if provider == "peft":
        return peft_attention
    return lambda q, k, v, pk, pv, mask, causal: ops.prefix_attention(q, k, v, pk, pv, mask, causal=causal)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES, ids=shape_name)
def test_prefix_attention_train(benchmark, s, provider):
    B, S, P, H, D = s["B"], s["S"], s["P"], s["H"], s["D"]
    tensors = inputs(s, S, grad=True)
    mask = padding_mask(B, S)
    g = hf_layout(B, H, S, D, gen=torch.Generator(device=device()).manual_seed(1))
    attend = attention_fn(provider)

    def forward():
        return attend(*tensors, mask, True)

    def call():
        for t in tensors:
            t.grad = None
        out = forward()
        out.backward(g)
        return out

    with forced(provider):
        call()  # warm-up (Triton compilation stays out of the timed rounds)
        saved = saved_bytes(forward, exclude=tensors)
        forward_flops = 4 * B * H * S * (P + S / 2) * D
        record(
            benchmark, op="prefix_attention", provider=provider, shape="train " + shape_name(s), tokens=B * S,
            saved_bytes=saved, flops=int(3.5 * forward_flops), prefix=P,
        )  # fmt: skip
        out = benchmark(call)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES, ids=shape_name)
def test_prefix_attention_decode(benchmark, s, provider):
    B, S, P, H, D = s["B"], s["S"], s["P"], s["H"], s["D"]
    tensors = inputs(s, 1, grad=False)
    mask = padding_mask(B, S)
    attend = attention_fn(provider)
    element = torch.finfo(DTYPE).bits // 8

    def call():
        with torch.no_grad():
            return attend(*tensors, mask, True)

    with forced(provider):
        call()
        record(
            benchmark, op="prefix_attention", provider=provider, shape="decode " + shape_name(s), tokens=B,
            flops=4 * B * H * (P + S) * D, bytes=element * 2 * H * D * (B * S + P), prefix=P,
        )  # fmt: skip
        out = benchmark(call)
    assert torch.isfinite(out.float()).all()
