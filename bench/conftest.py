"""Benchmark setup: on a GPU the `benchmark` fixture times with CUDA events.

Every bench file calls `benchmark(fn)` (or `benchmark.pedantic(...)`) as on the CPU. Where CUDA is
available this conftest hands them a wrapper of pytest-benchmark's fixture that
- for `benchmark(fn)`: runs fn once, then times it with `triton.testing.do_bench` (CUDA events, the
  L2 cache flushed before each run) and stores those per-run times as the pytest-benchmark stats, so
  the JSON, the report and `bench.compare` read GPU and CPU runs the same way;
- for `benchmark.pedantic(...)`: synchronises the device after setup and after each round, so the
  wall-clock rounds include the kernels;
- records torch.cuda.max_memory_allocated over one call as extra_info["max_memory_allocated_mb"]
  and the timer used as extra_info["timer"].
On the CPU the fixture is pytest-benchmark's own (time.perf_counter).
With FASTADAPTERS_BENCH_PARTIAL=<file> each finished benchmark is also appended to that file as one
JSON line, so `python -m bench` keeps the results of a file that runs out of time.
"""

import functools
import json
import os

import pytest
import torch


def cuda_times_ms(fn, min_runs: int = 10) -> list[float]:
    """Per-run times of fn() in ms, from CUDA events (triton.testing.do_bench where available)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    rep_ms = max(100.0, min_runs * estimate_ms)  # at least min_runs runs, even for slow steps
    try:
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=int(rep_ms), return_mode="all")
        if isinstance(times, (list, tuple)) and times:
            return [float(t) for t in times]
    except Exception:  # noqa: BLE001 - no triton, or a triton without return_mode="all": time with events here
        pass  # (fn itself ran just before, so an error of fn's own is raised again by the loop below)
    times = []
    for _ in range(max(min_runs, int(rep_ms / estimate_ms))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


class CudaBenchmark:
    """pytest-benchmark's fixture with CUDA-synchronised timing (see the module docstring)."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def _record_memory(self):
        self._inner.extra_info.setdefault(
            "max_memory_allocated_mb", torch.cuda.max_memory_allocated() / 2**20
        )

    def __call__(self, fn, *args, **kwargs):
        inner = self._inner
        make_stats = getattr(inner, "_make_stats", None)
        if inner.disabled or make_stats is None or getattr(inner, "_mode", None):
            return (
                inner(fn, *args, **kwargs) if inner.disabled else self.pedantic(fn, args, kwargs, rounds=10)
            )
        call = functools.partial(fn, *args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = call()
        torch.cuda.synchronize()
        self._record_memory()
        times_ms = cuda_times_ms(call)
        inner._mode = "benchmark(...) timed with CUDA events"
        stats = make_stats(1)
        for t in times_ms:
            stats.update(t / 1e3)
        inner.extra_info["timer"] = "cuda-event (triton.testing.do_bench)"
        return result

    def pedantic(
        self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1, warmup_rounds=0, iterations=1
    ):
        def synced_target(*a, **k):
            out = target(*a, **k)
            torch.cuda.synchronize()
            return out

        def synced_setup():
            out = setup()
            torch.cuda.synchronize()
            return out

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = self._inner.pedantic(
            synced_target,
            args=args,
            kwargs=kwargs,
            setup=None if setup is None else synced_setup,
            teardown=teardown,
            rounds=rounds,
            warmup_rounds=warmup_rounds,
            iterations=iterations,
        )
        self._record_memory()
        self._inner.extra_info.setdefault("timer", "wall-clock, device synchronised")
        return result


def append_partial(fixture) -> None:
    """Appends the finished benchmark, as pytest-benchmark's JSON, to $FASTADAPTERS_BENCH_PARTIAL."""
    path = os.environ.get("FASTADAPTERS_BENCH_PARTIAL")
    stats = getattr(fixture, "stats", None)
    if (
        not path
        or stats is None
        or getattr(fixture, "has_error", False)
        or getattr(fixture, "disabled", False)
    ):
        return
    try:
        entry = stats.as_dict(include_data=False)
    except Exception:  # noqa: BLE001 - another pytest-benchmark version: the final JSON still has it
        return
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


@pytest.fixture
def benchmark(benchmark):  # noqa: F811 - wraps pytest-benchmark's fixture of the same name
    yield CudaBenchmark(benchmark) if torch.cuda.is_available() else benchmark
    append_partial(benchmark)
