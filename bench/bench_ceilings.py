"""The machine's ceilings, measured in the same run as the ops: copy bandwidth and matmul rate.

The report divides each op's achieved GB/s and TFLOP/s (extra_info bytes and flops over the median
time) by these. On a GPU: a 1 GiB device-to-device copy and a bf16 8192³ matmul; on the CPU: a
256 MiB copy and an fp32 1536³ matmul.
"""

import pytest
import torch

from bench.common import device, on_gpu, pick, record

COPY_MIB = pick(256, 4, gpu=1024)
MATMUL = pick((1536, torch.float32), (64, torch.float32), gpu=(8192, torch.bfloat16))


def test_copy_bandwidth(benchmark):
    n = COPY_MIB * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device())
    dst = torch.empty_like(src)
    record(benchmark, op="ceiling", provider="copy", shape=f"{COPY_MIB}MiB", bytes=2 * src.nbytes)
    benchmark(dst.copy_, src)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("size,dtype", [MATMUL], ids=lambda v: str(v).replace("torch.", ""))
def test_matmul(benchmark, size, dtype):
    a = torch.randn(size, size, device=device()).to(dtype)
    b = torch.randn(size, size, device=device()).to(dtype)
    out = torch.empty(size, size, device=device(), dtype=dtype)
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    record(
        benchmark,
        op="ceiling",
        provider=f"matmul-{name}",
        shape=f"{size}x{size}x{size}",
        flops=2 * size**3,
        device="cuda" if on_gpu() else "cpu",
    )
    benchmark(torch.mm, a, b, out=out)
    assert out.shape == (size, size)
