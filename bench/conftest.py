"""Benchmark setup: on the CPU the `benchmark` fixture times providers in interleaved rounds; on a GPU
it times with CUDA events.

Every bench file calls `benchmark(fn)` (or `benchmark.pedantic(...)`) the same way. The fixture is
pytest-benchmark's own object with its class swapped for a subclass. Where CUDA is available it
- for `benchmark(fn)`: runs fn once, then times it with `triton.testing.do_bench` (CUDA events, the
  L2 cache flushed before each run) and stores those per-run times as the pytest-benchmark stats, so
  the JSON, the report and `bench.compare` read GPU and CPU runs the same way;
- for `benchmark.pedantic(...)`: synchronises the device after setup and after each round, so the
  wall-clock rounds include the kernels;
- records torch.cuda.max_memory_allocated over one call as extra_info["max_memory_allocated_mb"]
  and the timer used as extra_info["timer"].
On the CPU (a shared machine, whose speed drifts by tens of percent from one minute to the next)
`benchmark(fn)` runs fn once (the warm-up, and the value the test gets back) and defers the timed rounds
to the end of the file. There the benchmarks of each group (one op and shape: the providers compared)
run in interleaved rounds, each round calling every provider once in an order that rotates, with the
backend each test had forced, so every ratio in a group comes from the same minutes. Rounds per group:
pytest-benchmark's --benchmark-min-rounds, or more until the slowest provider has had
--benchmark-max-time seconds. The stats and JSON are pytest-benchmark's own; extra_info["timer"] says
which timing was used. `benchmark.pedantic` is pytest-benchmark's own, not interleaved.
With FASTADAPTERS_BENCH_PARTIAL=<file> each finished benchmark (on the CPU: once its group's rounds are
done, at the end of the file) is also appended to that file as one JSON line, so `python -m bench` keeps
the results of a file that runs out of time.
"""

import functools
import json
import math
import os
import time

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture


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


# Benchmarks of this file whose timed rounds wait for the end of the file:
# (fixture, stats, call, forced backend, seconds of the first call).
_DEFERRED: list = []


class InterleavedBenchmark(BenchmarkFixture):
    """pytest-benchmark's fixture with the rounds deferred and interleaved (see the module docstring)."""

    def __call__(self, fn, *args, **kwargs):
        if self.disabled or self._mode:
            return super().__call__(fn, *args, **kwargs)  # disabled (smoke runs), or used twice: its error
        from fastadapters.ops._dispatch import forced_backend

        call = functools.partial(fn, *args, **kwargs)
        start = time.perf_counter()
        result = call()
        estimate = time.perf_counter() - start
        self._mode = "benchmark(...) in interleaved rounds"
        self.extra_info["timer"] = "wall-clock, interleaved rounds within the group"
        _DEFERRED.append((self, self._make_stats(1), call, forced_backend(), estimate))
        return result


def run_deferred() -> None:
    """Times every deferred benchmark, group by group, in interleaved rounds; then appends the partials."""
    from fastadapters.ops import use_backend

    groups: dict[str, list] = {}
    for entry in _DEFERRED:
        groups.setdefault(entry[0].group, []).append(entry)
    _DEFERRED.clear()
    for entries in groups.values():
        fixture = entries[0][0]
        slowest = max(estimate for *_, estimate in entries)
        rounds = max(fixture._min_rounds, math.ceil(fixture._max_time / max(slowest, 1e-9)))
        for r in range(rounds):
            for i in range(len(entries)):
                _, stats, call, backend, _ = entries[(r + i) % len(entries)]
                with use_backend(backend):
                    start = time.perf_counter()
                    call()
                    stats.update(time.perf_counter() - start)
        for fixture, *_ in entries:
            append_partial(fixture)


@pytest.fixture(scope="module", autouse=True)
def _interleaved_rounds():
    yield
    run_deferred()


class CudaBenchmark(BenchmarkFixture):
    """pytest-benchmark's fixture with CUDA-synchronised timing (see the module docstring)."""

    def _record_memory(self):
        self.extra_info.setdefault("max_memory_allocated_mb", torch.cuda.max_memory_allocated() / 2**20)

    def __call__(self, fn, *args, **kwargs):
        if self.disabled:
            return super().__call__(fn, *args, **kwargs)
        if self._mode:
            return self.pedantic(fn, args, kwargs, rounds=10)  # raises pytest-benchmark's "used twice"
        call = functools.partial(fn, *args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = call()
        torch.cuda.synchronize()
        self._record_memory()
        times_ms = cuda_times_ms(call)
        self._mode = "benchmark(...) timed with CUDA events"
        stats = self._make_stats(1)
        for t in times_ms:
            stats.update(t / 1e3)
        self.extra_info["timer"] = "cuda-event (triton.testing.do_bench)"
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
        result = super().pedantic(
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
        self.extra_info.setdefault("timer", "wall-clock, device synchronised")
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
    # The same object, its class swapped: pytest-benchmark checks that the fixture is its own type.
    benchmark.__class__ = CudaBenchmark if torch.cuda.is_available() else InterleavedBenchmark
    yield benchmark
    if not any(entry[0] is benchmark for entry in _DEFERRED):  # deferred ones: after their rounds
        append_partial(benchmark)
