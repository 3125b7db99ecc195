"""ops.lora_embedding (PEFT's LoRA on an embedding) against reference.lora_embedding: values and gradients."""

import pytest
import torch

from fastadapters import ops, reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


@pytest.mark.parametrize("dtype", sorted(TOL, key=str))
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("shape", [(7,), (2, 5), (0, 4)])
def test_lora_embedding_matches_reference(dtype, padding_idx, shape):
    torch.manual_seed(0)
    vocab, d, r = 11, 13, 3
    ids = torch.randint(0, vocab, shape)
    if ids.numel():
        ids.view(-1)[0] = 3  # the padding row is looked up
    leaves = [
        torch.randn(vocab, d, dtype=dtype),
        torch.randn(r, vocab, dtype=dtype),
        torch.randn(d, r, dtype=dtype),
    ]
    fast_leaves = [t.clone().requires_grad_() for t in leaves]
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    y = ops.lora_embedding(ids, *fast_leaves, 0.7, padding_idx)
    ref = reference.lora_embedding(ids, *ref_leaves, 0.7, padding_idx)
    atol, rtol = TOL[dtype]
    assert y.shape == (*shape, d)
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    (y * torch.arange(d, dtype=dtype)).sum().backward()
    (ref * torch.arange(d, dtype=dtype)).sum().backward()
    for name, a, b in zip(("weight", "lora_a", "lora_b"), fast_leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol, msg=f"d{name}")
    if padding_idx is not None and ids.numel():
        assert fast_leaves[1].grad[:, 3].abs().max() == 0, "the padding row of Aᵀ gets no gradient"


def test_lora_embedding_only_requested_gradients():
    ids = torch.tensor([[1, 2], [2, 0]])
    weight, a = torch.randn(4, 6), torch.randn(2, 4, requires_grad=True)
    b = torch.randn(6, 2)
    ops.lora_embedding(ids, weight, a, b, 2.0).sum().backward()
    assert a.grad is not None and weight.grad is None and a.grad[:, 3].abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ids=torch.tensor([1.0])), TypeError, "ids must be an int32 or int64"),
        (dict(lora_a=torch.randn(2, 5)), ValueError, r"lora_a must have shape \(2, 4\) \(rank, V\)"),
        (dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b must have shape \(6, 2\) \(d, rank\)"),
        (dict(weight=torch.randn(4, 6, dtype=torch.float16)), TypeError, "lora_a must have weight's dtype"),
        (dict(padding_idx=9), ValueError, r"padding_idx must be in \[-4, 4\)"),
    ],
)
def test_lora_embedding_bad_inputs_are_named(kwargs, error, match):
    args = dict(
        ids=torch.tensor([1]), weight=torch.randn(4, 6), lora_a=torch.randn(2, 4), lora_b=torch.randn(6, 2)
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.lora_embedding(
            args["ids"], args["weight"], args["lora_a"], args["lora_b"], 1.0, args.get("padding_idx")
        )


def test_lora_embedding_custom_op_is_consistent():
    from fastadapters.ops.lora_embedding import LORA_EMBEDDING

    ids = torch.tensor([[1, 2, 3]])
    args = (
        ids,
        torch.randn(4, 5),
        torch.randn(2, 4, requires_grad=True),
        torch.randn(5, 2, requires_grad=True),
    )
    torch.library.opcheck(LORA_EMBEDDING.custom, (*args, 0.5, -1))
