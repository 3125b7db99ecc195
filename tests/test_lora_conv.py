"""ops.lora_conv (PEFT's LoRA on Conv1d/2d/3d, the update folded into the kernel) against
reference.lora_conv (three convolutions, as PEFT runs them): values and gradients."""

import pytest
import torch

from fastadapters import ops, reference

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}
CASES = {  # spatial input shape, kernel, stride, padding
    "1d": ((11,), (3,), 2, 1),
    "2d": ((7, 9), (3, 2), (1, 2), (1, 0)),
    "3d": ((5, 4, 6), (2, 3, 1), 1, 0),
}


@pytest.mark.parametrize("dtype", sorted(TOL, key=str))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_conv_matches_reference(case, bias, dtype):
    torch.manual_seed(0)
    spatial, kernel, stride, padding = CASES[case]
    n, cin, cout, r, d = 2, 5, 7, 3, len(spatial)
    leaves = [
        torch.randn(n, cin, *spatial, dtype=dtype),
        torch.randn(cout, cin, *kernel, dtype=dtype),
        torch.randn(cout, dtype=dtype) if bias else None,
        torch.randn(r, cin, *kernel, dtype=dtype),
        torch.randn(cout, r, *[1] * d, dtype=dtype),
    ]
    fast = [None if t is None else t.clone().requires_grad_() for t in leaves]
    ref = [None if t is None else t.clone().requires_grad_() for t in leaves]
    y = ops.lora_conv(*fast, 0.6, stride, padding)
    y_ref = reference.lora_conv(*ref, 0.6, stride, padding)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    for name, a, b in zip(("x", "weight", "bias", "lora_a", "lora_b"), fast, ref):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol, msg=f"d{name}")


def test_lora_conv_only_requested_gradients():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    a, b = torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(4, 2, 1, 1)
    ops.lora_conv(x, w, None, a, b, 1.0, 1, 1).sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape and w.grad is None and x.grad is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.randn(4, 3)), ValueError, r"weight must be a 1-, 2- or 3-d convolution kernel"),
        (dict(x=torch.randn(1, 2, 6, 6)), ValueError, r"x must have shape \(1, 3, 6, 6\) \(N, in, \*S\)"),
        (dict(lora_b=torch.randn(4, 2, 3, 3)), ValueError, r"lora_b must have shape \(4, 2, 1, 1\)"),
        (dict(stride=(1, 0)), ValueError, r"stride must be an int >= 1 or 2 of them"),
        (dict(padding="same"), ValueError, r"padding must be an int >= 0 or 2 of them"),
    ],
)
def test_lora_conv_bad_inputs_are_named(kwargs, error, match):
    args = dict(
        x=torch.randn(1, 3, 6, 6),
        weight=torch.randn(4, 3, 3, 3),
        bias=None,
        lora_a=torch.randn(2, 3, 3, 3),
        lora_b=torch.randn(4, 2, 1, 1),
        scale=1.0,
        stride=1,
        padding=1,
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.lora_conv(**args)


def test_lora_conv_custom_op_is_consistent():
    from fastadapters.ops.lora_conv import LORA_CONV

    args = (
        torch.randn(2, 3, 5, 5, requires_grad=True),
        torch.randn(4, 3, 3, 3),
        torch.randn(4),
        torch.randn(2, 3, 3, 3, requires_grad=True),
        torch.randn(4, 2, 1, 1, requires_grad=True),
    )
    torch.library.opcheck(LORA_CONV.custom, (*args, 0.5, [1, 1], [1, 1]))
