"""The LoRA embedding op (PEFT's lora.Embedding): y = W[ids] + scale · Aᵀ[ids] Bᵀ.

weight W: [V, d] (the embedding table), lora_a A: [r, V], lora_b B: [d, r] (PEFT's lora_embedding_A/B).
Forward gathers the ids' rows of W and of Aᵀ once and adds the expand into the gathered rows in place (one
addmm, no [N, d] delta tensor). Backward saves only the ids (the gathered Aᵀ rows are regathered, r numbers
per token): dB = s·dyᵀ t, dA = scatter-add of s·dy B over the ids, dW = scatter-add of dy, each only when
asked; rows at padding_idx get no gradient, as in torch's embedding. One backend: torch (a gather and GEMMs).
"""

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._autograd import Autograd, Op
from fastadapters.ops.lora import LORA_DTYPES


def _forward(
    ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, padding_idx: int
) -> Tensor:
    flat = ids.reshape(-1)
    y = weight.index_select(0, flat)
    t = lora_a.index_select(1, flat).T
    y.addmm_(t, lora_b.T, alpha=scale)
    return y.view(*ids.shape, weight.shape[1])


def _fake(ids, weight, lora_a, lora_b, scale, padding_idx):
    return weight.new_empty(*ids.shape, weight.shape[1])


def _backward_forward(
    dy: Tensor,
    ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    padding_idx: int,
    vocab: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dweight, dlora_a, dlora_b), empty where `needs` (weight, lora_a, lora_b) is False."""
    flat = ids.reshape(-1)
    dy2 = dy.reshape(-1, dy.shape[-1])
    keep = None if padding_idx < 0 else (flat != padding_idx).to(dy2.dtype)[:, None]
    dw, da, db = (dy.new_empty(0) for _ in range(3))  # separate: custom-op outputs must not alias
    if needs[0]:
        rows = dy2 if keep is None else dy2 * keep
        dw = dy2.new_zeros(vocab, dy2.shape[1]).index_add_(0, flat, rows)
    if needs[1]:
        dt = torch.mm(dy2, lora_b).mul_(scale)
        if keep is not None:
            dt.mul_(keep)
        da = dy2.new_zeros(lora_a.shape).index_add_(1, flat, dt.T)
    if needs[2]:
        t = lora_a.index_select(1, flat)
        db = torch.mm(dy2.T, t.T).mul_(scale)
    return dw, da, db


def _backward_fake(dy, ids, lora_a, lora_b, scale, padding_idx, vocab, needs):
    return (
        dy.new_empty(vocab, dy.shape[-1]) if needs[0] else dy.new_empty(0),
        lora_a.new_empty(lora_a.shape) if needs[1] else dy.new_empty(0),
        lora_b.new_empty(lora_b.shape) if needs[2] else dy.new_empty(0),
    )


def _setup(ctx, inputs, output):
    ids, weight, lora_a, lora_b, scale, padding_idx = inputs
    ctx.needs = [weight.requires_grad, lora_a.requires_grad, lora_b.requires_grad]
    ctx.scale, ctx.padding_idx, ctx.vocab = scale, padding_idx, weight.shape[0]
    ctx.save_for_backward(ids, lora_a, lora_b)


def _backward(ctx, grads, run):
    ids, lora_a, lora_b = ctx.saved_tensors
    dy = grads[0]
    if dy is None:
        return None, None, None, None, None, None
    dw, da, db = run(dy, ids, lora_a, lora_b, ctx.scale, ctx.padding_idx, ctx.vocab, ctx.needs)
    needs = ctx.needs
    return None, dw if needs[0] else None, da if needs[1] else None, db if needs[2] else None, None, None


LORA_EMBEDDING = Op(
    "lora_embedding", _forward, _fake, autograd=Autograd(_setup, _backward, _backward_forward, _backward_fake)
)


def lora_embedding(
    ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, padding_idx: int | None = None
) -> Tensor:
    """y = W[ids] + scale · Aᵀ[ids] Bᵀ (PEFT's LoRA on an embedding).

    ids: integer tensor of any shape, values in [0, V); weight: [V, d]; lora_a: [r, V]; lora_b: [d, r]
    (weight, lora_a, lora_b share one float dtype and ids' device); padding_idx: a row that gets no gradient.
    Returns [*ids.shape, d].
    """
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be an int32 or int64 torch.Tensor, got {ids!r:.80}")
    w = C.check_tensor("weight", weight, ndim=2, dtypes=LORA_DTYPES)
    if w.device != ids.device:
        raise ValueError(f"weight must be on ids' device {ids.device}, got {C.describe(w)}")
    vocab, d = w.shape
    a = C.check_tensor("lora_a", lora_a, ndim=2, dtypes=LORA_DTYPES)
    C.check_like("lora_a", a, "weight", w)
    C.check_shape("lora_a", a, (a.shape[0], vocab), "rank, V")
    b = C.check_tensor("lora_b", lora_b, ndim=2, dtypes=LORA_DTYPES)
    C.check_like("lora_b", b, "weight", w)
    C.check_shape("lora_b", b, (d, a.shape[0]), "d, rank")
    scale = C.check_scale("scale", scale)
    if padding_idx is not None and not -vocab <= padding_idx < vocab:
        raise ValueError(f"padding_idx must be in [-{vocab}, {vocab}), got {padding_idx!r}")
    pad = -1 if padding_idx is None else padding_idx % vocab
    return LORA_EMBEDDING(ids, weight, lora_a, lora_b, scale, pad)
