"""One autograd pattern for every op: a custom op for tracing, a plain autograd.Function for eager calls.

An op module writes its op once, as functions of the custom op's own arguments (lists of tensors, optional
tensors, floats):
    forward(*args) -> outputs                 the custom op's body: dispatch, then the backend's kernels
    fake(*args) -> outputs                    shapes only (torch.compile, meta tensors)
and, when it has a backward,
    setup(ctx, args, outputs)                 saves what backward needs (ctx.save_for_backward, attributes)
    backward(ctx, grads, run) -> input grads  one per argument (a list for a list argument, None if none);
                                              `run` is the backward: the custom op when traced, else its body
    backward_forward(*args), backward_fake    the backward custom op's body and fake
`Op` registers fastadapters::<name> (and fastadapters::<name>_backward) with torch.library, so Dynamo and
AOTAutograd see one node per call, and calls them as `op(*args)`: the custom op when traced (`traced`),
else `EagerFunction`, which runs the same forward/setup/backward without the custom op's per-call cost.
Grads of outputs nobody used arrive as None (never materialised as zeros).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from fastadapters.ops._dispatch import traced


class Autograd(NamedTuple):
    """An op's backward: setup(ctx, args, outputs); backward(ctx, grads, run) -> input grads; the backward
    custom op's body (forward) and fake (see the module docstring)."""

    setup: Callable
    backward: Callable
    forward: Callable
    fake: Callable


class Op:
    """A registered op: `op(*args)` runs it; `op.custom` is the torch.library custom op (opcheck, tests).

    tensor_lists: positions of the arguments that are lists of tensors (they need gradients one by one).
    Without `autograd`, the op is inference-only: asking for a gradient raises `no_backward_message`.
    """

    def __init__(
        self,
        name: str,
        forward: Callable,
        fake: Callable,
        *,
        tensor_lists: tuple[int, ...] = (),
        autograd: "Autograd | None" = None,
        no_backward_message: str = "",
    ):
        setup, backward, backward_forward, backward_fake = autograd or (None,) * 4
        self.name, self.forward, self.setup, self.backward = name, forward, setup, backward
        self.tensor_lists = tensor_lists
        self.custom = torch.library.custom_op(f"fastadapters::{name}", forward, mutates_args=())
        self.custom.register_fake(fake)
        if backward is None:
            self.backward_forward = None

            def refuse(ctx, *grads):
                raise RuntimeError(no_backward_message or f"{name} has no backward")

            self.custom.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)
            return
        self.backward_forward = backward_forward
        self.backward_custom = torch.library.custom_op(
            f"fastadapters::{name}_backward", backward_forward, mutates_args=()
        )
        self.backward_custom.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            setup(ctx, inputs, output)

        def traced_backward(ctx, *grads):
            return backward(ctx, grads, self.backward_custom)

        self.custom.register_autograd(traced_backward, setup_context=setup_context)

    def __call__(self, *args):
        """The op's outputs for `args` (the custom op's arguments)."""
        if traced(args[0]):
            return self.custom(*args)
        if self.backward is None:
            if torch.is_grad_enabled() and _wants_grad(args):
                return self.custom(*args)  # its autograd raises the clear no-backward error
            return self.forward(*args)
        flat = list(args)
        for i in reversed(self.tensor_lists):
            flat[i : i + 1] = [len(args[i]), *args[i]]
        *out, layout = EagerFunction.apply(self, *flat)
        return _unflatten_outputs(out, layout)


def _wants_grad(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)):
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
                return True
    return False


def _unflatten_args(op: Op, flat: tuple) -> list:
    args, i = [], 0
    lists = op.tensor_lists
    while i < len(flat):
        if len(args) in lists:
            n = flat[i]
            args.append(list(flat[i + 1 : i + 1 + n]))
            i += 1 + n
        else:
            args.append(flat[i])
            i += 1
    return args


def _flatten_outputs(outputs) -> tuple[tuple, tuple]:
    if isinstance(outputs, torch.Tensor):
        return (outputs,), (None,)
    flat, layout = [], []
    for o in outputs:
        if isinstance(o, (list, tuple)):
            flat.extend(o)
            layout.append(len(o))
        else:
            flat.append(o)
            layout.append(None)
    return tuple(flat), tuple(layout)


def _unflatten_outputs(flat, layout: tuple):
    """The outputs regrouped: a tensor for a single-tensor op, else a tuple with lists where `layout` says."""
    if layout == (None,):
        return flat[0]
    out, i = [], 0
    for n in layout:
        if n is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i : i + n]))
            i += n
    return tuple(out)


class EagerFunction(torch.autograd.Function):
    """The eager path of every op with a backward: apply(op, *flat args), list arguments spliced in as
    (length, *tensors) so autograd sees each tensor; the op's own forward, setup and backward run."""

    @staticmethod
    def forward(ctx, op, *flat):
        args = _unflatten_args(op, flat)
        outputs = op.forward(*args)
        ctx.op = op
        ctx.set_materialize_grads(False)
        op.setup(ctx, args, outputs)
        flat_out, ctx.layout = _flatten_outputs(outputs)
        inputs = {id(t) for t in flat if isinstance(t, torch.Tensor)}
        # A backend's output may be a view of a tensor made inside forward (a reshape back to x's leading
        # dims). Autograd would mark it a view of a multi-output Function, and any in-place op after the
        # layer (ReLU(inplace=True), `result += ...`) would raise; detach() gives the same memory unmarked.
        flat_out = tuple(
            o.detach() if isinstance(o, torch.Tensor) and o._is_view() and id(o._base) not in inputs else o
            for o in flat_out
        )
        return (*flat_out, ctx.layout)  # the layout (not a tensor) tells the caller how to regroup

    @staticmethod
    def backward(ctx, *flat_grads):
        op = ctx.op
        grads = _unflatten_outputs(flat_grads[:-1], ctx.layout)
        if ctx.layout == (None,):
            grads = (flat_grads[0],)
        input_grads = op.backward(ctx, grads, op.backward_forward)
        flat = [None]  # op
        for i, g in enumerate(input_grads):
            if i in op.tensor_lists:
                flat.append(None)  # the list's length
                flat.extend(g)
            else:
                flat.append(g)
        return tuple(flat)
