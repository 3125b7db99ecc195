"""The multi-LoRA linear op (serving): one batch, many LoRA adapters, one launch per layer.

    y[i] = x[i] Wᵀ + b + scales[a] · (x[i] A_aᵀ) B_aᵀ,  a = adapter_ids[i]  (−1: the base layer only)

The bank layout and the schedule (tokens sorted by adapter, once per batch) are in
fastadapters/ops/schedule.py. The grouped form (q/k/v or gate/up: members that read the same x) reads x once
for one shrink, and each member's expand is added straight into that member's base output (in place, no
delta tensor).

The op is inference-only: it has no backward (it raises if asked for one; train one adapter with
fastadapters.apply instead).

Backends implement, on x [N, d_in] (possibly strided):
    prepare(schedule) -> Tensor   backend data derived from the schedule (Triton: its tile table), cached
    forward(x, weights, biases, bank_a, bank_bs, ranks, scales, layout, adapter_ids, order, starts, tiles)
        -> ys
with ranks/scales flattened member-major (ranks[m * n + a]); layout = schedule.host_meta(ranks, k), the
bank's offsets; order [N] int64 token indices sorted by adapter (empty: the ids are sorted already, order =
identity); starts [n + 1] int64: adapter a's tokens are order[starts[a] : starts[a + 1]].
"""

from typing import Optional

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._autograd import Op
from fastadapters.ops._dispatch import Backend, extension, no_reasons, register, triton_reasons
from fastadapters.ops._torch_multi_lora import TorchMultiLora
from fastadapters.ops.multi_bottleneck import IMPLEMENTATIONS as BOTTLENECK_BACKENDS  # noqa: F401
from fastadapters.ops.multi_bottleneck import multi_bottleneck_adapter, run_bottleneck_unchecked  # noqa: F401
from fastadapters.ops.schedule import (  # noqa: F401  (AdapterSchedule, adapter_schedule: exported before)
    AdapterSchedule,
    adapter_schedule,
    check_schedule,
    host_meta,
    prepared,
)

IMPLEMENTATIONS = register(
    "multi_lora_linear",
    {
        "triton": Backend("triton", "fastadapters.kernels.multi_lora", triton_reasons),
        "cpu": Backend("cpu", "fastadapters.ops._cpu_multi_lora", extension("cpu", "multi_lora_forward")),
        "cuda": Backend("cuda", "fastadapters.ops._cuda_multi_lora", extension("cuda", "multi_lora_forward")),
        "torch": Backend("torch", TorchMultiLora, no_reasons),
    },
)
BACKENDS = IMPLEMENTATIONS  # the name this table had before (ops.BACKENDS is the tuple of backend names)


def _forward(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],  # noqa: UP045 (torch.library reads the annotation)
    bank_a: Tensor,
    bank_bs: list[Tensor],
    ranks: list[int],
    scales: list[float],
    adapter_ids: Tensor,
    order: Tensor,
    starts: Tensor,
    tiles: Tensor,
    backend: str,
) -> list[Tensor]:
    """Backend `backend` (the one `tiles` was prepared for) on x flattened to 2-D."""
    layout = host_meta(tuple(ranks), len(weights))
    ys = IMPLEMENTATIONS[backend].module().forward(
        x.reshape(-1, x.shape[-1]), weights, biases, bank_a, bank_bs, ranks, scales, layout,
        adapter_ids, order, starts, tiles,
    )  # fmt: skip
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _fake(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, order, starts, tiles, backend):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


MULTI_LORA_LINEAR = Op(
    "multi_lora_linear",
    _forward,
    _fake,
    no_backward_message="multi_lora_linear is inference-only and has no backward; run it under "
    "torch.no_grad() (train one adapter at a time with fastadapters.apply)",
)
_multi_lora_op = MULTI_LORA_LINEAR.custom


def _check_weight(sfx: str, x: Tensor, weight, bias) -> int:
    w = C.check_tensor(f"weight{sfx}", weight, ndim=2)
    C.check_like(f"weight{sfx}", w, "x", x)
    if w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight{sfx} must have shape (d_out, {x.shape[-1]}) to match x, got {C.describe(w)}"
        )
    if bias is not None:
        C.check_tensor(f"bias{sfx}", bias, ndim=1)
        C.check_like(f"bias{sfx}", bias, "x", x)
        C.check_shape(f"bias{sfx}", bias, (w.shape[0],), "d_out")
    return w.shape[0]


def _run(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, grouped: bool) -> list[Tensor]:
    C.check_tensor("x", x, min_ndim=1)
    C.check_features("x", x)
    k = len(weights)
    sfx = (lambda m: f"[{m}]") if grouped else (lambda m: "")
    d_outs = [_check_weight(sfx(m), x, w, b) for m, (w, b) in enumerate(zip(weights, biases))]
    if grouped:
        if not isinstance(ranks, (list, tuple)) or len(ranks) != k:
            raise ValueError(f"ranks must hold one sequence per member ({k}), got {ranks!r}")
        ranks = [C.int_list(f"ranks[{m}]", r) for m, r in enumerate(ranks)]
        n = len(ranks[0])
        if any(len(r) != n for r in ranks):
            raise ValueError(
                f"every member's ranks must cover the same adapters, got lengths {[len(r) for r in ranks]}"
            )
        if not isinstance(scales, (list, tuple)) or len(scales) != k:
            raise ValueError(f"scales must hold one sequence per member ({k}), got {scales!r}")
        scales = [C.float_list(f"scales[{m}]", s, n) for m, s in enumerate(scales)]
    else:
        ranks = [C.int_list("ranks", ranks)]
        n = len(ranks[0])
        scales = [C.float_list("scales", scales, n)]
    a = C.check_tensor("bank_a", bank_a, ndim=2)
    C.check_like("bank_a", a, "x", x)
    C.check_shape("bank_a", a, (sum(map(sum, ranks)), x.shape[-1]), "sum of the ranks, d_in")
    for m, (bank_b, d_out) in enumerate(zip(bank_bs, d_outs)):
        name = f"bank_b{sfx(m)}"
        C.check_tensor(name, bank_b, ndim=2)
        C.check_like(name, bank_b, "x", x)
        C.check_shape(name, bank_b, (sum(ranks[m]), d_out), "sum of the ranks, d_out")
    sched = check_schedule(adapter_ids, x, n)
    tensors = [x, *weights, *[b for b in biases if b is not None], bank_a, *bank_bs]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "multi_lora_linear is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or on tensors that do not require grad"
        )
    flat_ranks = [r for member in ranks for r in member]
    flat_scales = [s for member in scales for s in member]
    return run_unchecked(x, weights, biases, bank_a, bank_bs, flat_ranks, flat_scales, sched)


def run_unchecked(x, weights, biases, bank_a, bank_bs, ranks: list, scales: list, schedule: AdapterSchedule):
    """The grouped op without the input checks, for callers that validated their bank once (AdapterBank).

    ranks/scales flattened member-major (ranks[m * n + a]); biases entries may be None.
    """
    backend = schedule.backend("multi_lora_linear", x.dtype)
    tiles = prepared(schedule, backend)
    return MULTI_LORA_LINEAR(
        x, list(weights), list(biases), bank_a, list(bank_bs), ranks, scales,
        schedule.adapter_ids, schedule.order, schedule.starts, tiles, backend.name,
    )  # fmt: skip


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bank_a: Tensor,
    bank_b: Tensor,
    ranks,
    scales,
    adapter_ids,
) -> Tensor:
    """y[i] = x[i] Wᵀ + b + scales[a] · (x[i] A_aᵀ) B_aᵀ with a = adapter_ids[i] (−1: no adapter).

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; ranks: n ints >= 0; scales: n floats;
    bank_a: [Σ ranks, d_in], rows off_a : off_a + ranks[a] hold A_a (off_a = Σ_{b<a} ranks[b]);
    bank_b: [Σ ranks, d_out], the same rows hold B_aᵀ; adapter_ids: integers of shape x.shape[:-1], or an
    AdapterSchedule from adapter_schedule (reused across layers). Inference only (no backward).
    """
    return _run(x, [weight], [bias], bank_a, [bank_b], ranks, scales, adapter_ids, grouped=False)[0]


def multi_lora_linear_grouped(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    bank_a: Tensor,
    bank_bs: list[Tensor],
    ranks,
    scales,
    adapter_ids,
) -> list[Tensor]:
    """ys[m][i] = x[i] W_mᵀ + b_m + scales[m][a] · (x[i] A_{m,a}ᵀ) B_{m,a}ᵀ, a = adapter_ids[i]; x read once.

    x: [..., d_in]; weights[m]: [d_out_m, d_in]; biases[m]: [d_out_m] or None; ranks[m], scales[m]: member
    m's n ranks (>= 0) and scales; bank_a: [Σ_a Σ_m ranks[m][a], d_in], adapter a's block holds A_{0,a},
    A_{1,a}, … stacked (blocks in adapter order); bank_bs[m]: [Σ_a ranks[m][a], d_out_m] holding B_{m,a}ᵀ in
    adapter order; adapter_ids: as in multi_lora_linear. Inference only (no backward).
    """
    k = len(weights)
    if k == 0 or len(biases) != k or len(bank_bs) != k:
        raise ValueError(
            f"weights, biases and bank_bs must be non-empty lists of one length, got {len(weights)}, "
            f"{len(biases)}, {len(bank_bs)}"
        )
    return _run(x, weights, biases, bank_a, bank_bs, ranks, scales, adapter_ids, grouped=True)
