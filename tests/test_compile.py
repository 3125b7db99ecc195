"""torch.compile(fullgraph=True) over the public ops: each is a torch.library custom op with a fake
implementation and its autograd registered, so Dynamo and AOTAutograd see one node per op call and no
graph break. On the CPU with the aot_eager backend (the fake impls and the registered backward are what is
being tested; inductor's C++ codegen would only add minutes on 2 cores)."""

import torch
from models import tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

import fastadapters
from fastadapters import ops
from fastadapters.layers import LoraLinear
from fastadapters.ops import multi_lora as ml_ops

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def op_nodes(counter, prefix: str) -> int:
    return sum(str(n.target).startswith(prefix) for g in counter.graphs for n in g.graph.nodes)


def assert_compiled_grads_match(f, x, leaves, op: str):
    """f compiled as one graph (one `op` node) gives the gradients of eager f(x) for every leaf."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    want = torch.autograd.grad(f(x), leaves)
    got = torch.autograd.grad(compiled(x), leaves)
    assert counter.frame_count == 1 and op_nodes(counter, op) == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_compiled_lora_training_step_matches_eager():
    """A patched tiny Llama: loss and every LoRA gradient through the compiled graph equal eager's."""
    torch._dynamo.reset()
    model = tiny_model("llama", num_hidden_layers=1)
    fastadapters.apply(
        model, fastadapters.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
    )
    model.train()
    for m in model.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)  # nonzero B: dA and the output depend on it
            m.group = (
                None  # compiled graphs run one op per layer; eager does the same here, drawing the same seeds
            )
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(1)
    loss_eager = model(input_ids=ids, labels=ids).loss
    grads_eager = torch.autograd.grad(loss_eager, params)

    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, fullgraph=True, backend=counter)
    torch.manual_seed(1)
    loss = step(ids)
    grads = torch.autograd.grad(loss, params)

    assert counter.frame_count == 1
    assert op_nodes(counter, "fastadapters.lora_linear") == len(TARGETS), "one custom-op node per LoRA layer"
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for g, ge in zip(grads, grads_eager):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-6)


def test_compiled_multi_adapter_forward_matches_eager():
    """Two multi-LoRA layers (grouped and single) for one batch of mixed adapters, compiled as one graph."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    n_tok, d = 23, 32
    ranks = [[4, 8, 0], [2, 1, 16]]
    rows = sum(r[a] for a in range(3) for r in ranks)
    x = torch.randn(n_tok, d, generator=gen)
    weights = [torch.randn(d, d, generator=gen), torch.randn(16, d, generator=gen)]
    biases = [None, torch.randn(16, generator=gen)]
    bank_a = torch.randn(rows, d, generator=gen)
    bank_bs = [torch.randn(sum(ranks[0]), d, generator=gen), torch.randn(sum(ranks[1]), 16, generator=gen)]
    scales = [[1.0, 2.0, 0.5], [1.0, 0.25, 1.0]]
    # One schedule per batch, shared by the layers (as AdapterBank does); sorting the ids is data-dependent,
    # so it happens before the compiled region.
    schedule = ml_ops.adapter_schedule(torch.randint(-1, 3, (n_tok,), generator=gen), 3)
    a2 = bank_a[: sum(ranks[0])].contiguous()  # a second layer: member 0's ranks, its own A

    def forward(x):
        q, v = ml_ops.multi_lora_linear_grouped(x, weights, biases, bank_a, bank_bs, ranks, scales, schedule)
        h = torch.relu(q)
        return ml_ops.multi_lora_linear(h, weights[0], None, a2, bank_bs[0], ranks[0], scales[0], schedule), v

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    with torch.no_grad():
        got = compiled(x)  # first: the schedule was prepared when it was made, not by an eager call
        eager = forward(x)
    assert counter.frame_count == 1
    assert op_nodes(counter, "fastadapters.multi_lora_linear") == 2
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


def test_compiled_bottleneck_backward_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(19, 24, generator=gen, requires_grad=True)
    down = torch.randn(7, 24, generator=gen, requires_grad=True)
    up = torch.randn(24, 7, generator=gen, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)

    def f(h):
        return ops.bottleneck_adapter(h, down, up, scale, "gelu").square().sum()

    assert_compiled_grads_match(f, h, [h, down, up, scale], "fastadapters.bottleneck_adapter")


def test_compiled_prefix_attention_backward_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(2))
    prefix_k = torch.randn(2, 3, 8, generator=gen, requires_grad=True)
    prefix_v = torch.randn(2, 3, 8, generator=gen, requires_grad=True)

    def f(q):
        return ops.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True).square().sum()

    assert_compiled_grads_match(f, q, [q, prefix_k, prefix_v], "fastadapters.prefix_attention")


def test_every_public_op_is_a_custom_op_with_fake_and_autograd():
    from torch._library.custom_ops import OPDEFS

    for name in ("lora_linear", "bottleneck_adapter", "multi_lora_linear", "prefix_attention"):
        opdef = OPDEFS[f"fastadapters::{name}"]
        assert opdef._abstract_fn is not None, f"{name} has no fake implementation"
        assert opdef._backward_fn is not None, f"{name} has no registered autograd"
    for name in ("lora_linear_backward", "bottleneck_adapter_backward", "prefix_attention_backward"):
        assert OPDEFS[f"fastadapters::{name}"]._abstract_fn is not None, f"{name} has no fake implementation"
