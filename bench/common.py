"""Shared by every bench/bench_<op>.py: provider names, saved-bytes counting, and the record format.

Record format (read by the report, `python -m bench`): each benchmark calls
    record(benchmark, op=..., provider=..., shape=..., **extra)
which sets benchmark.group = "<op> <shape>" and benchmark.extra_info = {op, provider, shape, **extra}.
Providers: "reference", "peft", "eager", "frozen"/"base" (the layer without adapter) and
"fastadapters-<backend>". Within one group the report gives every provider's time ratio to each
baseline present (peft, eager, frozen, base, reference). Extra keys the report understands:
saved_bytes (bytes saved for backward), tokens (tokens processed per call, for tokens/s),
flops and bytes (work per call, for TFLOP/s and GB/s on a GPU), rank,
max_memory_allocated_mb.

Timing: call `record(...)` then `benchmark(fn)` (or `benchmark.pedantic(...)`) as usual. On the CPU,
bench/conftest.py runs fn once there and times it at the end of the file, in rounds interleaved with the
other providers of its group (so call record first: it sets the group; and keep fn's inputs alive, as
fn's closure does). On a GPU, bench/conftest.py wraps the fixture so that `benchmark(fn)` times fn
with CUDA events (`triton.testing.do_bench`, L2 flushed between runs) and stores those times as the
pytest-benchmark stats, and `pedantic` synchronises the device around each round; both record
torch.cuda.max_memory_allocated.
Shapes: `pick(real, smoke, gpu=...)`; `python -m bench` runs the suite and writes the report.
"""

import contextlib
import os

import torch

BASELINES = ("peft", "eager", "frozen", "base", "gemms", "reference")

# FASTADAPTERS_BENCH_SMOKE=1 shrinks every shape so the bodies run once, untimed, as smoke tests
# (`pytest bench --benchmark-disable`); every bench file picks its shapes through `pick`.
SMOKE = os.environ.get("FASTADAPTERS_BENCH_SMOKE") == "1"


def pick(real, smoke, gpu=None):
    """`smoke` under FASTADAPTERS_BENCH_SMOKE=1, else `gpu` on a GPU when given, else `real`.

    `real` is the shape the issue asks to measure on the CPU (the quick suite, < 10 min on 2 cores);
    `gpu` the realistic GPU shapes (4096-wide layers, ranks 8-64, batch 1-256, 16+ adapters).
    """
    if SMOKE:
        return smoke
    if gpu is not None and on_gpu():
        return gpu
    return real


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def fastadapters_providers(backends: dict, **info) -> list[str]:
    """'fastadapters-<name>' for each backend of an op that can run here (Triton only on a GPU)."""
    dev = device()
    names = []
    for name, backend in backends.items():
        if name == "triton" and dev.type == "cpu":
            continue  # the interpreter is for correctness tests, not timing
        if not backend.reasons(device=dev, **info):
            names.append(f"fastadapters-{name}")
    return names


@contextlib.contextmanager
def forced(provider: str):
    """Forces the backend named by a 'fastadapters-<backend>' provider for the duration of the block."""
    from fastadapters.ops import use_backend

    name = provider.split("-", 1)[1] if provider.startswith("fastadapters-") else None
    with use_backend(name):
        yield


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs.

    Tensors in `exclude` (typically the model's parameters, which exist anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def synchronize():
    if on_gpu():
        torch.cuda.synchronize()


def record(benchmark, *, op: str, provider: str, shape: str, **extra) -> None:
    """Labels a pytest-benchmark result so the report can group and compare it."""
    benchmark.group = f"{op} {shape}"
    benchmark.extra_info.update(op=op, provider=provider, shape=shape, machine=os.uname().nodename, **extra)
