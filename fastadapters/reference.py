"""Plain-PyTorch ground truth for every op, computed in fp32 and cast back to the input dtype.

Tests and benchmarks both import these, so they cannot drift apart. They favour clarity over speed.
"""

import torch
from torch import Tensor

from fastadapters.ops._activations import torch_fn


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """y = x Wᵀ + b + scale · ((x ⊙ dropout_mask) Aᵀ) Bᵀ.

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; lora_a: [r, d_in]; lora_b: [d_out, r];
    dropout_mask: like x, the dropout multiplier (0 or 1/(1-p)), or None for no dropout.
    """
    xf = x.float()
    y = xf @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    xd = xf if dropout_mask is None else xf * dropout_mask.float()
    y = y + scale * ((xd @ lora_a.float().T) @ lora_b.float().T)
    return y.to(x.dtype)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scale: float,
) -> Tensor:
    """y = m / ‖W + scale · B A‖_row ⊙ (x (W + scale · B A)ᵀ) + b, the merged weight formed (DoRA).

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; lora_a: [r, d_in]; lora_b: [d_out, r];
    magnitude: [d_out]. The norm is detached, as in the DoRA paper (section 4.3) and PEFT.
    """
    merged = weight.float() + scale * (lora_b.float() @ lora_a.float())
    norm = torch.linalg.norm(merged, dim=1).detach()
    y = (x.float() @ merged.T) * (magnitude.float() / norm)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lora_embedding(
    ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, padding_idx: int | None = None
) -> Tensor:
    """y = W[ids] + scale · Aᵀ[ids] Bᵀ (fp64 stays fp64).

    ids: integers, any shape; weight: [V, d]; lora_a: [r, V]; lora_b: [d, r].
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    y = torch.nn.functional.embedding(ids, weight.to(acc), padding_idx=padding_idx)
    t = torch.nn.functional.embedding(ids, lora_a.to(acc).T, padding_idx=padding_idx)
    return (y + scale * (t @ lora_b.to(acc).T)).to(weight.dtype)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    adapter_ids: Tensor | None = None,
    *,
    prefix_ids: Tensor | None = None,
) -> Tensor:
    """softmax(scale · q [P_k; K]ᵀ + mask) [P_v; V], by concatenating the prefix to every row's keys.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S_kv, D]; prefix_k, prefix_v: [Hkv, P, D] shared, or [A, Hkv, P, D]
    with adapter_ids: [B] (-1 = no prefix for that row; prefix_ids is its old name). attention_mask
    (sequence keys only): [B, S_kv]
    (nonzero = keep), 4-D bool [B|1, Hq|1, S, S_kv] (True = attend) or 4-D float (added to the scores).
    The prefix is always visible; `causal` is bottom-right aligned (key j visible to query i iff
    j <= i + S_kv - S). A row that sees no key at all outputs zeros.
    """
    B, Hq, S, D = q.shape
    Hkv, S_kv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    ids = adapter_ids if prefix_ids is None else prefix_ids
    if ids is None:
        pk = prefix_k.float().expand(B, *prefix_k.shape)
        pv = prefix_v.float().expand(B, *prefix_v.shape)
        present = torch.ones(B, dtype=torch.bool, device=q.device)
    else:
        rows = ids.long().clamp(min=0)
        pk, pv = prefix_k.float()[rows], prefix_v.float()[rows]
        present = ids >= 0
    P = pk.shape[2]
    keys = torch.cat([pk, k.float()], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([pv, v.float()], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # [B, Hq, S, P + S_kv]
    allowed = torch.ones(B, 1, S, P + S_kv, dtype=torch.bool, device=q.device)
    allowed[..., :P] &= present.view(B, 1, 1, 1)
    if causal:
        i = torch.arange(S, device=q.device).view(S, 1)
        j = torch.arange(S_kv, device=q.device).view(1, S_kv)
        allowed[..., P:] &= j <= i + (S_kv - S)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            allowed[..., P:] &= (attention_mask != 0).view(B, 1, 1, S_kv)
        elif attention_mask.dtype == torch.bool:
            always = torch.ones(*attention_mask.shape[:3], P, dtype=torch.bool, device=q.device)
            allowed = allowed & torch.cat([always, attention_mask], dim=-1)
        else:
            bias = torch.zeros(*attention_mask.shape[:3], P + S_kv, device=q.device)
            bias[..., P:] = attention_mask.float()
            scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (probs @ values).to(q.dtype)


def bottleneck_adapter(
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    scale,
    activation: str,
    dropout_mask: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """out = residual + scale · f((h ⊙ dropout_mask) Dᵀ) Uᵀ, residual = h when None (the series form).

    h: [..., d_in]; down_weight: [b, d_in]; up_weight: [d_out, b]; scale: float or 0-dim tensor;
    activation: tanh, relu, gelu (exact erf), silu or sigmoid; dropout_mask: like h, the dropout multiplier
    (0 or 1/(1-p)), or None; residual: [..., d_out] or None.
    """
    act = torch_fn(activation)
    hf = h.float()
    hd = hf if dropout_mask is None else hf * dropout_mask.float()
    y = act(hd @ down_weight.float().T) @ up_weight.float().T
    s = scale.float() if isinstance(scale, Tensor) else scale
    res = hf if residual is None else residual.float()
    return (res + s * y).to(h.dtype)


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bank_a: Tensor,
    bank_b: Tensor,
    ranks,
    scales,
    adapter_ids: Tensor,
) -> Tensor:
    """y[i] = x[i] Wᵀ + b + scales[a] · (x[i] A_aᵀ) B_aᵀ with a = adapter_ids[i] (−1: the base layer only).

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; ranks, scales: one int (>= 0) and one float
    per adapter; bank_a: [R, d_in], R = Σ ranks, rows off_a : off_a + ranks[a] (off_a = ranks[0] + … +
    ranks[a-1]) hold A_a; bank_b: [R, d_out], the same rows hold B_aᵀ; adapter_ids: integers, x.shape[:-1].
    """
    xf = x.float().reshape(-1, x.shape[-1])
    y = xf @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    ids = adapter_ids.reshape(-1).to(x.device)
    off = 0
    for a, (r, s) in enumerate(zip(ranks, scales)):
        rows = ids == a
        if r > 0 and bool(rows.any()):
            lora_a, lora_bt = bank_a[off : off + r].float(), bank_b[off : off + r].float()
            y[rows] = y[rows] + s * ((xf[rows] @ lora_a.T) @ lora_bt)
        off += r
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def multi_lora_linear_grouped(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    bank_a: Tensor,
    bank_bs: list[Tensor],
    ranks,
    scales,
    adapter_ids: Tensor,
) -> list[Tensor]:
    """ys[m] = multi_lora_linear(x, weights[m], biases[m], A_m, bank_bs[m], ranks[m], scales[m], adapter_ids).

    Members m share x. ranks[m][a], scales[m][a]: member m's rank (>= 0) and scale for adapter a.
    bank_a: [Σ_a Σ_m ranks[m][a], d_in]: adapter a's rows are one block (adapters in order) holding
    A_{0,a}, A_{1,a}, … stacked; bank_bs[m]: [Σ_a ranks[m][a], d_out_m], rows in adapter order hold B_{m,a}ᵀ.
    """
    k, n = len(weights), len(ranks[0])
    rows = [[] for _ in range(k)]
    off = 0
    for a in range(n):
        for m in range(k):
            rows[m].extend(range(off, off + ranks[m][a]))
            off += ranks[m][a]
    ys = []
    for m in range(k):
        member_a = bank_a[torch.tensor(rows[m], dtype=torch.long, device=bank_a.device)]
        w, b, bank_b = weights[m], biases[m], bank_bs[m]
        ys.append(multi_lora_linear(x, w, b, member_a, bank_b, ranks[m], scales[m], adapter_ids))
    return ys


def multi_bottleneck_adapter(
    h: Tensor,
    bank_down: Tensor,
    bank_up: Tensor,
    sizes,
    scales,
    activations,
    adapter_ids: Tensor,
    residual: Tensor | None = None,
) -> Tensor:
    """out[i] = res[i] + scales[a] · f_a(h[i] D_aᵀ) U_aᵀ with a = adapter_ids[i] (−1: out[i] = res[i]).

    h: [..., d_in]; res = h (series) or residual [..., d_out] (parallel); sizes, scales, activations: one
    bottleneck size (>= 0), float and activation name per adapter; bank_down: [Σ sizes, d_in], rows
    off_a : off_a + sizes[a] hold D_a; bank_up: [Σ sizes, d_out], the same rows hold U_aᵀ.
    """
    hf = h.float().reshape(-1, h.shape[-1])
    res = hf if residual is None else residual.float().reshape(hf.shape[0], -1)
    out = res.clone()
    ids = adapter_ids.reshape(-1).to(h.device)
    off = 0
    for a, (b, s, act) in enumerate(zip(sizes, scales, activations)):
        rows = ids == a
        if b > 0 and bool(rows.any()):
            down, up = bank_down[off : off + b].float(), bank_up[off : off + b].float().T
            out[rows] = bottleneck_adapter(hf[rows], down, up, s, act, residual=res[rows])
        off += b
    return out.reshape(*h.shape[:-1], -1).to(h.dtype)


def lora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    stride,
    padding,
) -> Tensor:
    """y = conv(x, W) + b + scale · conv₁ₓ₁(conv(x, A), B), three convolutions as PEFT runs them.

    x: [N, in, *S]; weight: [out, in, *k]; bias: [out] or None; lora_a: [r, in, *k]; lora_b: [out, r, 1, …].
    """
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}
    conv = conv[weight.dim()]
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = conv(xf, weight.to(acc), None if bias is None else bias.to(acc), stride, padding)
    t = conv(xf, lora_a.to(acc), None, stride, padding)
    return (y + scale * conv(t, lora_b.to(acc))).to(x.dtype)
