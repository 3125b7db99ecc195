"""The benchmark suite's plumbing: every bench body runs once (untimed, smoke shapes), and the report,
the README block and bench.compare are checked on synthetic results with known ratios."""

import contextlib
import glob
import json
import os
import subprocess
import sys

import pytest

import fastadapters.ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ is a folder of the repository, not part of the installed package

from bench import compare, report  # noqa: E402
from bench import conftest as bench_conftest  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_env(**extra) -> dict:
    env = dict(os.environ, FASTADAPTERS_BENCH_SMOKE="1", PYTHONPATH=ROOT, **extra)
    env.pop("TRITON_INTERPRET", None)  # as `python -m bench` runs them
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def test_every_bench_body_runs_once():
    files = sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py")))
    assert any(f.endswith("bench_train_step.py") for f in files)
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE",
           "--benchmark-disable", "-p", "no:xdist"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and "failed" not in out, out[-2000:]


def test_side_by_side_runs_and_saves(tmp_path):
    """bench.side_by_side: every provider timed in interleaved rounds, the table and JSON written."""
    code = (
        "import bench.side_by_side as sbs; "
        f"sbs.RESULTS_DIR = {str(tmp_path)!r}; raise SystemExit(sbs.main(['--rounds', '2', '--save']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=bench_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for provider in ("peft", "fastadapters", "peft+accelerate", "frozen"):
        assert f"| {provider} |" in proc.stdout, proc.stdout
    (path,) = glob.glob(str(tmp_path / "*-side-by-side.json"))
    runs = json.load(open(path))["providers"]
    assert all(len(r["times"]) == 2 and r["saved_bytes"] > 0 for r in runs.values())


def bench_record(op, provider, shape, median, q1=None, q3=None, **extra) -> dict:
    q1 = median * 0.9 if q1 is None else q1
    q3 = median * 1.1 if q3 is None else q3
    return {
        "name": f"test_{op}[{shape}-{provider}]",
        "group": f"{op} {shape}",
        "extra_info": {"op": op, "provider": provider, "shape": shape, **extra},
        "stats": {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "rounds": 5, "mean": median},
    }


def synthetic(scale: float = 1.0, gpu: str | None = None, date="2026-11-28T10:00:00") -> dict:
    """A results JSON with known ratios: fastadapters twice as fast as peft, R = 1.05 at rank 8."""
    b = []
    for rank in (8, 32):
        shape = f"d1024 N2048 r{rank}"
        b.append(bench_record("lora", "frozen", shape, 0.010 * scale, rank=rank, saved_bytes=8 << 20))
        b.append(bench_record("lora", "peft", shape, 0.0125 * scale, rank=rank, saved_bytes=24 << 20))
        b.append(
            bench_record("lora", "fastadapters-torch", shape, 0.0105 * scale, rank=rank, saved_bytes=12 << 20)
        )
    b.append(bench_record("bottleneck", "eager", "h4096 N256", 0.004 * scale, bytes=4e9 * 0.004))
    b.append(bench_record("bottleneck", "fastadapters-cpu", "h4096 N256", 0.002 * scale, bytes=4e9 * 0.004))
    b.append(bench_record("bottleneck_adapter", "gemms", "N2048", 0.0016 * scale))  # the floor
    b.append(bench_record("bottleneck_adapter", "eager", "N2048", 0.004 * scale))
    b.append(bench_record("bottleneck_adapter", "fastadapters-cpu", "N2048", 0.002 * scale))
    for provider, t, saved in (
        ("peft", 0.40, 200 << 20),
        ("fastadapters", 0.25, 120 << 20),
        ("frozen", 0.2, 0),
    ):
        b.append(bench_record("train_step", provider, "h512 L4 B4 T256 r16", t * scale, tokens=1024,
                              saved_bytes=saved, peak_rss_mb=1400.0))  # fmt: skip
    b.append(bench_record("ceiling", "copy", "256MiB", 0.1, bytes=1e10 * 0.1))
    b.append(bench_record("ceiling", "matmul-fp32", "1536", 0.2, flops=1e11 * 0.2))
    fa = {
        "schema": 1, "date": date, "machine": "host-cpu2", "command": "python -m bench", "mode": "cpu",
        "subset": False, "gpu": gpu, "git_commit": "0123456789abcdef", "git_dirty": False,
        "system": {"cpu": "Test CPU", "cores": 2, "versions": {"torch": "2.13.0", "peft": "0.21.2"}},
        "runs": [{"file": "bench_lora.py", "status": "ok", "rc": 0, "seconds": 12.0, "count": 6, "notes": []},
                 {"file": "bench_prefix_attention.py", "status": "failures", "rc": 1, "seconds": 3.0,
                  "count": 0, "notes": ["FAILED bench/bench_prefix_attention.py::test_x - boom"]}],
    }  # fmt: skip
    return {"machine_info": {}, "commit_info": {}, "benchmarks": b, "fastadapters": fa}


def write(tmp_path, name, data) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_report_ratios_r_and_plots(tmp_path):
    md_path, pngs = report.write_report(write(tmp_path, "run.json", synthetic()))
    md = open(md_path).read()
    # t / t(peft) = 0.0105 / 0.0125, t / t(frozen) = R = 1.05; peft's R = 1.25
    assert "| d1024 N2048 r8 | fastadapters-torch | 10.5 ms | 9.45 ms – 11.6 ms | 0.840 | 1.050 |" in md
    assert "| lora | d1024 N2048 r32 | peft | 32 | 1.250 |" in md
    assert "| lora | fastadapters-torch | peft | 1.19× | 1.19× – 1.19× | 2 |" in md  # 12.5 / 10.5
    assert "| bottleneck | fastadapters-cpu | eager | 2.00× |" in md
    # the bottleneck's floor (its GEMMs alone) is no provider of the summary; R against it: 2 / 1.6
    assert "| bottleneck_adapter | N2048 | fastadapters-cpu |  | 1.250 |" in md
    assert "| bottleneck_adapter | gemms |" not in md
    # saved bytes 12 MiB vs peft's 24: 0.5; train step tokens/s = 1024 / 0.25
    assert "| 12 | 0.500 |" in md and "4,096" in md
    # achieved GB/s against the copy ceiling measured in the run: 4 GB/s of 10 = 40%, 8 GB/s = 80%
    assert "copy bandwidth 10.0 GB/s" in md and "| 4 | 40% |" in md and "| 8 | 80% |" in md
    assert "bench_prefix_attention.py | failures" in md and "boom" in md
    assert "- commit: 0123456789abcdef" in md
    assert sorted(os.path.basename(p) for p in pngs) == ["run-r-vs-rank.png", "run-speedup.png"]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == PNG_MAGIC and os.path.getsize(png) > 10_000
        assert f"]({os.path.basename(png)})" in md


def test_report_gpu_units_and_empty_run(tmp_path):
    md = open(report.write_report(write(tmp_path, "gpu.json", synthetic(gpu="NVIDIA H200")))[0]).read()
    assert "GPU NVIDIA H200" in md and "CUDA events" in md and "matmul 0.1 TFLOP/s" in md
    empty = synthetic()
    empty["benchmarks"] = []
    md_path, pngs = report.write_report(write(tmp_path, "empty.json", empty))
    assert pngs == [] and "No benchmark results in this run." in open(md_path).read()


def test_compare_prints_ratios_and_flags_regressions(tmp_path, capsys):
    a = write(tmp_path, "a.json", synthetic())
    b = write(tmp_path, "b.json", synthetic(scale=0.5))
    assert compare.main([a, b]) == 0
    out = capsys.readouterr().out
    assert "| lora | d1024 N2048 r8 | peft | 12.5 ms | 6.25 ms | 0.500 |" in out
    assert "| train_step | (geomean) |  |  |  | 0.500 |" in out
    assert "1.19× → 1.19×" in out  # the within-run speedup is machine-independent
    assert compare.main([b, a, "--fail-above", "1.5"]) == 1
    only_a = synthetic()
    only_a["benchmarks"].append(bench_record("multi_lora", "peft", "16 adapters", 0.01))
    compare.main([write(tmp_path, "c.json", only_a), b])
    assert "only in A: multi_lora / 16 adapters / peft" in capsys.readouterr().out


def test_update_readme_uses_latest_full_runs(tmp_path):
    from bench.__main__ import latest_results

    write(tmp_path, "old.json", synthetic(date="2026-11-01T00:00:00"))
    new = write(tmp_path, "new.json", synthetic(scale=0.5, date="2026-11-28T00:00:00"))
    gpu = write(tmp_path, "gpu.json", synthetic(gpu="NVIDIA H200"))
    smoke = synthetic(date="2026-12-01T00:00:00")
    smoke["fastadapters"]["mode"] = "smoke"
    write(tmp_path, "smoke.json", smoke)
    assert latest_results(str(tmp_path)) == [new, gpu]
    readme = os.path.join(tmp_path, "README.md")
    with open(readme, "w") as f:
        f.write(
            f"# x\n\n## Performance\n\n{report.README_BEGIN}\nold figures\n{report.README_END}\n\nafter\n"
        )
    report.update_readme(readme, report.readme_block([(p, report.load(p)) for p in (new, gpu)]))
    text = open(readme).read()
    assert "old figures" not in text and text.endswith(f"{report.README_END}\n\nafter\n")
    assert (
        "2-core CPU" in text and "GPU NVIDIA H200" in text and "| 1.600 | 1.250 | 0.600 |" in text
    )  # train: 0.4 / 0.25, 0.25 / 0.2 (the frozen model), 120 / 200 MiB
    assert "t/t(GEMMs): eager 2.50–2.50, fastadapters-cpu 1.25–1.25" in text
    assert "LoRA layer overhead R" in text and "fastadapters-torch 1.05–1.05; peft 1.25–1.25" in text


class FakeStats:
    def __init__(self):
        self.data = []

    def update(self, duration):
        self.data.append(duration)


class FakeFixture:
    """The parts of pytest-benchmark's BenchmarkFixture that bench/conftest.py's fixtures use."""

    def __init__(self):
        self.disabled, self._mode, self.extra_info, self.group, self.stats = False, None, {}, None, None
        self._min_rounds, self._max_time = 3, 0.0

    def _make_stats(self, iterations):
        self.stats = FakeStats()
        return self.stats


def fake_fixture(cls):
    """An instance of bench/conftest.py's fixture class `cls` (a BenchmarkFixture subclass, as
    pytest-benchmark requires) holding only FakeFixture's state."""

    class Fake(FakeFixture, cls):
        pass

    fixture = object.__new__(Fake)
    FakeFixture.__init__(fixture)
    return fixture


def test_interleaved_rounds_alternate_providers(monkeypatch):
    """CPU timing: each provider of a group runs once when the test calls benchmark(fn); the timed rounds
    run later, every round calling each provider once in a rotating order, with its forced backend."""
    monkeypatch.delenv("FASTADAPTERS_BACKEND", raising=False)
    seen = []
    fixtures = {}
    for provider, backend in (("a", None), ("b", "torch"), ("c", None)):
        fixtures[provider] = fixture = fake_fixture(bench_conftest.InterleavedBenchmark)
        fixture.group = "op shape"
        with contextlib.ExitStack() as stack:
            if backend:
                stack.enter_context(fastadapters.ops.use_backend(backend))
            out = fixture(lambda p=provider: seen.append((p, os.environ.get("FASTADAPTERS_BACKEND"))) or p)
        assert out == provider and fixture.stats.data == []  # the warm-up call only, no timing yet
    other = fake_fixture(bench_conftest.InterleavedBenchmark)
    other.group = "another group"
    other(lambda: seen.append(("x", None)))
    seen.clear()
    bench_conftest.run_deferred()
    assert [p for p, _ in seen] == list("abcbcacab") + ["x"] * 3
    assert all(env == ("torch" if p == "b" else None) for p, env in seen)
    for fixture in (*fixtures.values(), other):
        assert len(fixture.stats.data) == 3
        assert fixture.extra_info["timer"] == "wall-clock, interleaved rounds within the group"
    assert bench_conftest._DEFERRED == []


def test_cuda_wrapper_stores_cuda_event_times(monkeypatch):
    import torch
    from pytest_benchmark.fixture import BenchmarkFixture

    assert hasattr(BenchmarkFixture, "_make_stats")  # the pytest-benchmark internal the wrapper relies on
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**20)
    monkeypatch.setattr(bench_conftest, "cuda_times_ms", lambda fn: [2.0, 1.0, 3.0])
    wrapped = fake_fixture(bench_conftest.CudaBenchmark)
    wrapped.group = "lora x"
    calls = []
    assert wrapped(lambda v: calls.append(v) or v + 1, 41) == 42
    assert calls == [41]
    assert wrapped.stats.data == [0.002, 0.001, 0.003]
    assert wrapped.extra_info == {
        "max_memory_allocated_mb": 3.0,
        "timer": "cuda-event (triton.testing.do_bench)",
    }
    with pytest.raises(Exception):  # noqa: B017 - used twice: pytest-benchmark's own error
        wrapped.pedantic(lambda: None)


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")
def test_runner_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--smoke", "--only", "ceilings", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = glob.glob(os.path.join(tmp_path, "*-smoke.json"))
    data = report.load(json_path)
    assert {b["extra_info"]["provider"] for b in data["benchmarks"]} == {"copy", "matmul-fp32"}
    fa = data["fastadapters"]
    assert fa["mode"] == "smoke" and fa["runs"][0]["status"] == "ok" and fa["system"]["versions"]["torch"]
    md = open(json_path[: -len(".json")] + ".md").read()
    assert "## Ceilings (measured in this run)" in md and "bench_ceilings.py | ok" in md


def test_partial_results_survive_a_killed_file(tmp_path, monkeypatch):
    from bench.__main__ import read_part

    class Stats:
        def as_dict(self, include_data=True):
            return bench_record("lora", "peft", "d8", 0.5)

    json_path = os.path.join(tmp_path, "bench_lora.py.json")
    monkeypatch.setenv("FASTADAPTERS_BENCH_PARTIAL", json_path + ".partial")
    done = FakeFixture()
    done.stats = Stats()
    for fixture in (done, FakeFixture(), done):  # a fixture that never ran leaves no line
        bench_conftest.append_partial(fixture)
    part = read_part(json_path)
    assert [b["stats"]["median"] for b in part["benchmarks"]] == [0.5, 0.5]
    assert read_part(os.path.join(tmp_path, "missing.json")) is None


def test_compare_several_runs_uses_median_speedups(tmp_path, capsys):
    runs_a = [write(tmp_path, f"a{i}.json", synthetic(scale=s)) for i, s in enumerate((1.0, 3.0, 0.5))]
    slower = synthetic()
    for record in slower["benchmarks"]:
        if record["extra_info"]["op"] == "lora" and record["extra_info"]["provider"] == "fastadapters-torch":
            record["stats"]["median"] *= 1.2  # our provider 1.2x slower: its speedup over peft drops
    runs_b = [write(tmp_path, f"b{i}.json", x) for i, x in enumerate((synthetic(scale=2.0), slower, slower))]
    assert compare.main([",".join(runs_a), ",".join(runs_a[::-1])]) == 0
    assert "worst median change: 1.000" in capsys.readouterr().out
    assert compare.main([",".join(runs_a), ",".join(runs_b), "--fail-drop", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "| lora | d1024 N2048 r8 | fastadapters-torch | 1.190 (1.19/1.19/1.19) | 0.992" in out
    assert "speedup(s) dropped by more than 5%" in out
