"""Compile every Triton kernel the launchers start, for sm_90, on a machine without a GPU.

Run as a script, never under TRITON_INTERPRET (tests/test_kernels_common.py runs it in a subprocess). It
replaces `JITFunction.run` with a compile through `triton.compile(ASTSource(...), GPUTarget("cuda", 90, 32))`,
then calls the kernel modules' launchers on empty CPU tensors: every launch they make is compiled, not run.
The interpreter executes any Python; the compiler also checks constexpr use, loop-carried types and the
types the @triton.jit helpers receive.

    python tests/compile_kernels.py [--quick] [--all-configs] [--stats FILE] [--kernels DIR]

--quick compiles fewer variants (still every kernel and each constexpr branch at least once: the test's
choice). --all-configs compiles every autotune config (default: the first one, what FASTADAPTERS_AUTOTUNE=0
runs, which also shows that the switch reaches every kernel). A variant that fails to compile is reported
(on stderr, and counted on the last line), the others still compile, and the exit status is 1.
--stats writes, per launch, the SASS instruction count and the registers, shared and local memory ptxas
gives it (from the cubin, with triton's cuobjdump), to compare two versions of the kernels. --kernels loads
the four kernel modules from DIR instead of fastadapters.kernels.
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
    torch.uint8: "*u8",
}

LABEL = ["?"]  # the driver step being compiled, for --stats keys
LAUNCHES: list[tuple[str, object]] = []  # (key, CompiledKernel)
_SEEN: dict = {}
FAILED: dict = {}  # variant key -> why it did not compile
ALL_CONFIGS = [False]
QUICK = [False]  # --quick: one variant per constexpr branch, about a third of the launches


def _compile_only(self, *args, grid, warmup, **kwargs):
    """JITFunction.run's stand-in: types the arguments as triton's launcher would, then compiles."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    sig, consts = {}, {}
    for i, name in enumerate(self.arg_names):
        value = kwargs[name] if name in kwargs else args[i]
        param = self.params[i]
        if param.is_constexpr:
            sig[name], consts[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:  # triton specialises 1 as a constant
                sig[name], consts[(i,)] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{self.fn.__name__}: argument {name} has type {type(value).__name__}")
    key = (
        self.fn.__name__,
        tuple(sig.items()),
        tuple((k, str(v)) for k, v in consts.items()),
        tuple(options.items()),
    )
    if key in FAILED:
        return
    if key not in _SEEN:
        try:
            _SEEN[key] = triton.compile(
                ASTSource(fn=self, signature=sig, constexprs=consts), target=TARGET, options=options
            )
        except Exception as exc:  # noqa: BLE001 - counted and reported; the other variants still compile
            FAILED[key] = f"{LABEL[0]}: {self.fn.__name__} {options}: {type(exc).__name__}: {exc}"[:2000]
            return
    LAUNCHES.append((f"{LABEL[0]} #{len(LAUNCHES)} {self.fn.__name__}", _SEEN[key]))


def _configs_run(self, *args, grid, warmup, **kwargs):
    """Autotuner.run's stand-in: compiles the kernel with each of its configs, as autotuning would (only the
    first without --all-configs: what FASTADAPTERS_AUTOTUNE=0 runs)."""
    for cfg in self.configs if ALL_CONFIGS[0] else self.configs[:1]:
        extra = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **extra)


def _load(kernels_dir, name):
    if kernels_dir is None:
        return importlib.import_module(f"fastadapters.kernels.{name}")
    spec = importlib.util.spec_from_file_location(f"_kernels_under_test.{name}", f"{kernels_dir}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


# --------------------------------------------------------------------------------------------- drivers


def drive_lora(K):
    for dtype in (torch.float32, torch.bfloat16):
        if QUICK[0] and dtype == torch.float32:
            LABEL[0] = "lora fp32 forward"
            x, w, a, b = empty(33, 80), empty(48, 80), empty(8, 80), empty(48, 8)
            K.forward(x, [w], [None], [a], [b], [2.0], 0.0, None)
            continue
        n, d_in, d_outs, ranks = 33, 80, (48, 24), (8, 4)
        x = empty(n, d_in, dtype=dtype)
        ws = [empty(d, d_in, dtype=dtype) for d in d_outs]
        bs = [empty(d, dtype=dtype) for d in d_outs]
        As = [empty(r, d_in, dtype=dtype) for r in ranks]
        Bs = [empty(d, r, dtype=dtype) for d, r in zip(d_outs, ranks)]
        for p, seed in ((0.1, 5),) if QUICK[0] else ((0.0, None), (0.1, 5)):
            LABEL[0] = f"lora {dtype} p={p}"
            ys, t = K.forward(x, ws, bs, As, Bs, [2.0, 0.5], p, seed)
            needs = (True, [True, True], [True, True], [True, True], [True, True])
            K.backward(ys, x, ws, As, Bs, t, [2.0, 0.5], p, seed, needs)
            # Four members: grouped dx chains a second, accumulating launch.
            needs = (True, [False] * 4, [False] * 4, [True] * 4, [False] * 4)
            t4 = t.repeat(1, 3)[:, :32]
            K.backward([ys[0]] * 4, x, [ws[0]] * 4, [As[0]] * 4, [Bs[0]] * 4, t4, [1.0] * 4, p, seed, needs)
    LABEL[0] = "lora mask"
    K.dropout_mask((7, 9), 0.1, 3, "cpu")


def drive_bottleneck(K):
    acts = ("tanh", "relu", "gelu", "silu", "sigmoid")
    for dtype, activations in ((torch.float32, acts), (torch.bfloat16, ("gelu",))):
        for act in activations:
            sizes = (24,) if QUICK[0] and act != "gelu" else (24, 300)
            for b in sizes:  # fused forward; the two-kernel forward past FUSED_MAX_BOTTLENECK
                n, d = 33, 80
                h, down, up = empty(n, d, dtype=dtype), empty(b, d, dtype=dtype), empty(d, b, dtype=dtype)
                # (scale, dropout_p, seed): a float or a learned (tensor) scale, with and without dropout.
                variants = [(0.5, 0.0, None)]
                if act == "gelu":
                    tensor_scale = torch.empty((), dtype=dtype)
                    variants = [(0.5, 0.0, None), (tensor_scale, 0.1, 5)]
                    if not QUICK[0]:
                        variants += [(0.5, 0.1, 5), (tensor_scale, 0.0, None)]
                for scale, p, seed in variants:
                    LABEL[0] = f"bottleneck {dtype} {act} b={b} scale={type(scale).__name__} p={p}"
                    K.forward(h, down, up, scale, act, p, seed, None)
                    for residual in (False,) if QUICK[0] else (False, True):
                        needs = (True, True, True, isinstance(scale, torch.Tensor))
                        K.backward(h, h, down, up, None, scale, act, p, seed, residual, needs)
    LABEL[0] = "bottleneck mask"
    K.dropout_mask((7, 9), 0.1, 3, "cpu")


def drive_prefix(K):
    for dtype, D in ((torch.bfloat16, 80), (torch.float32, 64)):
        B, Hq, Hkv, S, P = 2, 4, 2, 33, 5
        q, k, pk = (
            empty(B, Hq, S, D, dtype=dtype),
            empty(B, Hkv, S, D, dtype=dtype),
            empty(3, Hkv, P, D, dtype=dtype),
        )
        masks = {
            0: None,
            1: empty(B, S, dtype=torch.bool),
            2: empty(B, 1, S, S, dtype=torch.bool),
            3: empty(B, 1, S, S, dtype=dtype),
        }
        for kind, mask in masks.items():
            if QUICK[0] and kind != (1 if dtype == torch.bfloat16 else 3):
                continue
            for causal, ids in ((True, torch.zeros(B, dtype=torch.int64)), (False, None)):
                LABEL[0] = f"prefix {dtype} D={D} mask={kind} causal={causal} per_row={ids is not None}"
                out, lse = K.forward(q, k, k, pk, pk, mask, kind, causal, 0.1, ids)
                K.backward(q, q, k, k, pk, pk, out, lse, mask, kind, causal, 0.1, ids, (True,) * 5)


def drive_multi_lora(K):
    for dtype in (torch.float32, torch.bfloat16):
        n_tok, d_in, d_out, n, g = 33, 80, 48, 3, 6
        x, y = empty(n_tok, d_in, dtype=dtype), empty(n_tok, d_out, dtype=dtype)
        bank_a, bank_b = empty(40, d_in, dtype=dtype), empty(40, d_out, dtype=dtype)
        t = empty(n_tok, 16)
        order, starts = empty(n_tok, dtype=torch.int64), empty(n + 1, dtype=torch.int64)
        tiles, meta = empty(2, g, dtype=torch.int32), empty(5, n, dtype=torch.int64)
        scales, acts = empty(1, n), empty(n, dtype=torch.int32)
        flags = dict(UPCAST=False, IEEE=dtype == torch.float32)
        quick = QUICK[0] and dtype == torch.float32
        for has_order in (False,) if quick else (False, True):
            for atomic in (False,) if quick else (False, True):
                LABEL[0] = f"multi_lora shrink {dtype} order={has_order} atomic={atomic}"
                K._multi_lora_shrink_kernel[(g, 2)](
                    x, bank_a, t, order, starts, tiles, meta, n, g, d_in, 64,
                    x.stride(0), x.stride(1), bank_a.stride(0), bank_a.stride(1), t.stride(0), t.stride(1),
                    HAS_ORDER=has_order, ATOMIC=atomic, BLOCK_M=16, BLOCK_R=16, BLOCK_K=128,
                    num_warps=4, **flags,
                )  # fmt: skip
            for has_act in (False,) if quick else (False, True):
                LABEL[0] = f"multi_lora expand {dtype} order={has_order} act={has_act}"
                K._multi_lora_expand_kernel[(g, 1)](
                    t, y, bank_b, order, starts, tiles, meta, scales, acts, n, g, 0, d_out,
                    t.stride(0), t.stride(1), y.stride(0), y.stride(1), bank_b.stride(0), bank_b.stride(1),
                    HAS_ORDER=has_order, HAS_ACT=has_act, BLOCK_M=16, BLOCK_R=16, BLOCK_N=64,
                    num_warps=4, **flags,
                )  # fmt: skip


DRIVERS = {"lora": drive_lora, "bottleneck": drive_bottleneck, "prefix_attention": drive_prefix,
           "multi_lora": drive_multi_lora}  # fmt: skip


def _stats(compiled) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage.stdout)}
    res["sass"] = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.M))
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stats")
    parser.add_argument("--kernels")
    parser.add_argument("--only", nargs="*", default=list(DRIVERS))
    args = parser.parse_args()
    os.environ["FASTADAPTERS_AUTOTUNE"] = "1" if args.all_configs else "0"
    JITFunction.run = _compile_only
    Autotuner.run = _configs_run
    ALL_CONFIGS[0] = args.all_configs
    QUICK[0] = args.quick
    for name in args.only:
        DRIVERS[name](_load(args.kernels, name))
    counts: dict[str, int] = {}
    for key in _SEEN:
        counts[key[0]] = counts.get(key[0], 0) + 1
    for name, count in sorted(counts.items()):
        print(f"{name} {count}")
    for why in FAILED.values():
        print(f"FAILED {why}", file=sys.stderr)
    print(f"compiled {len(_SEEN)} variants in {len(LAUNCHES)} launches; {len(FAILED)} failed")
    if args.stats:
        cache = {}
        out = {key: cache.setdefault(id(c), _stats(c)) for key, c in LAUNCHES}
        with open(args.stats, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
