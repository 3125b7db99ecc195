"""The per-row bottleneck adapter op out[i] = res[i] + s_a · f_a(h[i] D_aᵀ) U_aᵀ, a = adapter_ids[i].

The same bank layout, schedule and kernels as multi_lora_linear (fastadapters/ops/schedule.py; the shrink is
h Dᵀ, the expand adds f(t) Uᵀ), with the adapter's activation applied between them and the residual (h, or
the base layer's output) as the base. Inference-only, like multi_lora_linear.

Backends (those of multi_lora_linear that have it) implement, on h [N, d_in]:
    prepare(schedule) -> Tensor   as for multi_lora_linear
    bottleneck_forward(h, bank_down, bank_up, sizes, scales, layout, activations, adapter_ids, order, starts,
                       tiles, residual) -> out   (activations: codes into ACTIVATIONS; residual or None)
"""

from typing import Optional

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._activations import ACTIVATIONS
from fastadapters.ops._autograd import Op
from fastadapters.ops._dispatch import Backend, no_reasons, register, triton_reasons
from fastadapters.ops._torch_multi_lora import TorchMultiLora
from fastadapters.ops.schedule import check_schedule, host_meta, prepared

IMPLEMENTATIONS = register(
    "multi_bottleneck_adapter",
    {
        "triton": Backend("triton", "fastadapters.kernels.multi_lora", triton_reasons),
        "torch": Backend("torch", TorchMultiLora, no_reasons),
    },
)


def _forward(
    h: Tensor,
    bank_down: Tensor,
    bank_up: Tensor,
    sizes: list[int],
    scales: list[float],
    activations: list[int],
    adapter_ids: Tensor,
    order: Tensor,
    starts: Tensor,
    tiles: Tensor,
    residual: Optional[Tensor],  # noqa: UP045 (torch.library reads the annotation)
    backend: str,
) -> Tensor:
    """Backend `backend` (the one `tiles` was prepared for) on h flattened to 2-D."""
    h2 = h.reshape(-1, h.shape[-1])
    res = None if residual is None else residual.reshape(h2.shape[0], -1)
    out = IMPLEMENTATIONS[backend].module().bottleneck_forward(
        h2, bank_down, bank_up, sizes, scales, host_meta(tuple(sizes), 1), activations, adapter_ids, order,
        starts, tiles, res,
    )  # fmt: skip
    return out.reshape(*h.shape[:-1], out.shape[-1])


def _fake(h, bank_down, bank_up, sizes, scales, acts, adapter_ids, order, starts, tiles, res, backend):
    return h.new_empty(*h.shape[:-1], bank_up.shape[1])


MULTI_BOTTLENECK_ADAPTER = Op(
    "multi_bottleneck_adapter",
    _forward,
    _fake,
    no_backward_message="multi_bottleneck_adapter is inference-only and has no backward; run it under "
    "torch.no_grad()",
)
_multi_bottleneck_op = MULTI_BOTTLENECK_ADAPTER.custom


def run_bottleneck_unchecked(h, bank_down, bank_up, sizes, scales, activations, schedule, residual=None):
    """multi_bottleneck_adapter without the input checks (AdapterBank); activations as codes."""
    backend = schedule.backend("multi_bottleneck_adapter", h.dtype)
    tiles = prepared(schedule, backend)
    return MULTI_BOTTLENECK_ADAPTER(
        h, bank_down, bank_up, sizes, scales, activations, schedule.adapter_ids, schedule.order,
        schedule.starts, tiles, residual, backend.name,
    )  # fmt: skip


def multi_bottleneck_adapter(
    h: Tensor,
    bank_down: Tensor,
    bank_up: Tensor,
    sizes,
    scales,
    activations,
    adapter_ids,
    residual: Tensor | None = None,
) -> Tensor:
    """out[i] = res[i] + scales[a] · f_a(h[i] D_aᵀ) U_aᵀ with a = adapter_ids[i] (−1: out[i] = res[i]).

    h: [..., d_in]; res = h when residual is None (series; d_out = d_in) or residual: [..., d_out] (the base
    layer's output: the parallel form); sizes: n bottleneck sizes >= 0; scales: n floats; activations: n
    names of ACTIVATIONS (tanh, relu, gelu (exact erf), silu, sigmoid); bank_down: [Σ sizes, d_in], rows
    off_a : off_a + sizes[a] hold D_a; bank_up: [Σ sizes, d_out], the same rows hold U_aᵀ; adapter_ids: as
    in multi_lora_linear (a tensor of h.shape[:-1] or an AdapterSchedule). Inference only (no backward).
    """
    C.check_tensor("h", h, min_ndim=1)
    C.check_features("h", h)
    sizes = C.int_list("sizes", sizes)
    n = len(sizes)
    scales = C.float_list("scales", scales, n)
    if isinstance(activations, (str, bytes)) or not isinstance(activations, (list, tuple)):
        raise TypeError(
            f"activations must be a list of {n} activation names (one per adapter, in {ACTIVATIONS}), "
            f"got {type(activations).__name__}"
        )
    if len(activations) != n:
        raise ValueError(f"activations must hold one name per adapter ({n}), got {activations!r}")
    bad = [a for a in activations if a not in ACTIVATIONS]
    if bad:
        raise ValueError(f"activations must be names in {ACTIVATIONS}, got {bad}")
    down = C.check_tensor("bank_down", bank_down, ndim=2)
    C.check_like("bank_down", down, "h", h)
    C.check_shape("bank_down", down, (sum(sizes), h.shape[-1]), "sum of the sizes, d_in")
    up = C.check_tensor("bank_up", bank_up, ndim=2)
    C.check_like("bank_up", up, "h", h)
    if up.shape[0] != sum(sizes):
        raise ValueError(
            f"bank_up must have shape ({sum(sizes)}, d_out) (sum of the sizes), got {C.describe(up)}"
        )
    C.check_residual(residual, h, up.shape[1], "bank_up", up, (sum(sizes), h.shape[-1]))
    sched = check_schedule(adapter_ids, h, n)
    tensors = [h, down, up, *([] if residual is None else [residual])]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "multi_bottleneck_adapter is inference-only (no backward): call it under torch.no_grad() or "
            "torch.inference_mode(), or on tensors that do not require grad"
        )
    codes = [ACTIVATIONS.index(a) for a in activations]
    return run_bottleneck_unchecked(h, down, up, sizes, scales, codes, sched, residual)
