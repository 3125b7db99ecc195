"""A decoder model's structure, read from the model itself: where adapters can go on any `*ForCausalLM`.

`read_structure(model)` finds
- the decoder layers: the longest nn.ModuleList of one repeated block holding linear layers (not the head);
- in each layer the attention block (the outermost submodule whose class name says attention; cross-
  attention is skipped) and its linear layers by role: the *input projections* (those reading the layer's
  hidden features: q/k/v, or one fused qkv), the *output projection* (the last one writing hidden
  features), and among the inputs the *query* and *value* roles (by the usual leaf names; a lone fused
  input projection plays both);
- the MLP (a submodule whose class name says MLP, feed-forward or MoE; else, beside the attention, the
  layer's other linear layers); its input projections read the hidden features (gate/up, a
  fused gate_up, fc1, c_fc, dense_h_to_4h ...), its output projections write them (down, fc2, c_proj,
  dense_4h_to_h ...). Layers with few outputs (under hidden/4: MoE routers, gate scores) are not
  projections. MoE experts stored as 3-D parameters (Mixtral, Qwen3-MoE) are no linear layers;
- by one traced forward of a replica on the meta device (no memory, no compute): which linear layers read
  the same input tensor (shared-input groups: their LoRAs share one shrink), and which attention blocks
  call transformers' attention interface (ALL_ATTENTION_FUNCTIONS), with their key/value heads, head size
  and the features they pass (sliding window, logit soft-capping, attention sinks).

Where the trace cannot run (a model that is not a transformers PreTrainedModel, or an op without a meta
kernel), the structure still stands and the groups fall back to each block's input projections.
"""

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
PROBE = "fastadapters_probe"
_CACHE_ATTR = "_fastadapters_structure"

# Leaf names of the query and value roles (transformers' spellings); a lone fused input projection plays both.
QUERY_NAMES = ("q_proj", "q", "query", "wq", "q_lin", "query_proj", "q_b_proj")
VALUE_NAMES = ("v_proj", "v", "value", "wv", "v_lin", "value_proj", "kv_b_proj")
_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_MLP_CLASS = re.compile(r"mlp|feedforward|ffn|moe|experts?\b", re.IGNORECASE)
_CROSS = re.compile(r"cross|encoder_attn", re.IGNORECASE)


@dataclass
class AttentionBlock:
    """One layer's attention: module path, projections by role (full module names), and what the trace saw."""

    path: str
    inputs: tuple[str, ...]
    output: str | None
    query: str | None
    value: str | None
    interface: str | None = None  # the module (this block or inside it) that calls transformers' attention
    # interface in the traced forward: where a prefix goes


@dataclass
class MLPBlock:
    """One layer's MLP projections (full names): inputs read the hidden features, outputs write them."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class Structure:
    """What read_structure found; every name is a full module name of the bare model."""

    model_class: str
    layers: tuple[str, ...]
    attention: tuple[AttentionBlock, ...]
    mlp: tuple[MLPBlock, ...]
    linears: tuple[str, ...]  # every linear layer, output head included
    head: tuple[str, ...]  # the output head (excluded from "all-linear")
    groups: tuple[tuple[str, ...], ...] = ()
    trace: str = "not run"  # "complete", or why the trace stopped
    # module name -> (key/value heads, head size, features) of every module that called transformers'
    # attention interface in the traced forward, in module order
    attention_calls: dict = field(default_factory=dict)
    layer_of: dict = field(default_factory=dict, repr=False)  # module name -> its layer's path

    def relative(self, name: str) -> str:
        """`name` relative to its decoder layer ("mlp.down_proj"), or `name` itself outside the layers."""
        layer = self.layer_of.get(name)
        return name[len(layer) + 1 :] if layer else name


def _clean(name: str) -> str:
    """A module name with adapter wrappers' `base_layer` steps removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _named_linears(module: nn.Module, prefix: str = "", skip=frozenset()) -> dict[str, nn.Module]:
    """clean name -> linear layer under `module` (through adapter wrappers), in definition order; `skip`:
    names of nn.Linear subclasses the trace saw return something else than one output (Llama 4's router)."""
    found = {}
    for name, sub in module.named_modules(prefix=prefix):
        if name.rpartition(".")[2] == "base_layer" or ".base_layer." in name:
            continue
        base = _unwrap(sub)
        if isinstance(base, LINEAR_TYPES) and _clean(name) not in skip:
            found[_clean(name)] = base
    return found


def _shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        size = getattr(text, "hidden_size", None)
        if isinstance(size, int):
            return size
    try:
        return model.get_input_embeddings().embedding_dim
    except (AttributeError, NotImplementedError):
        return None


def _head_names(model: nn.Module) -> tuple[str, ...]:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        return ()
    return tuple(_clean(n) for n, m in model.named_modules() if m is head or _unwrap(m) is head)[:1]


def _decoder_layers(model: nn.Module, head: tuple[str, ...]) -> tuple[str, ...]:
    """The paths of the longest nn.ModuleList whose entries all hold linear layers (the decoder layers)."""
    best: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= len(best) or "base_layer" in name:
            continue
        if any(name == h or name.startswith(h + ".") for h in head):
            continue
        if all(_named_linears(child) for child in module):
            best = tuple(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return best


def _block_path(layer: nn.Module, path: str, pattern: re.Pattern, skip: str | None = None) -> str | None:
    """The outermost submodule of a layer whose class name matches `pattern` and that holds linear layers
    (cross-attention and anything under `skip` excluded)."""
    for name, module in layer.named_modules(prefix=path):
        if name == path or "base_layer" in name or _CROSS.search(name.rpartition(".")[2]):
            continue
        if skip is not None and name.startswith(skip + "."):
            continue
        if pattern.search(type(module).__name__) and _named_linears(module):
            return _clean(name)
    return None


def _split(
    linears: dict[str, nn.Module], hidden: int | None, last_writer: bool = False
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input projections, output projections) of one block's linear layers: inputs read the hidden
    features, outputs write them (those that do not also read them, else the last one defined; with
    `last_writer`, the last one defined)."""
    names = list(linears)
    if hidden is None:
        return tuple(names[:-1]), tuple(names[-1:])
    shapes = {n: _shape(m) for n, m in linears.items()}
    writers = [n for n in names if shapes[n][1] == hidden]
    outputs = writers[-1:] if last_writer else [n for n in writers if shapes[n][0] != hidden] or writers[-1:]
    inputs = [n for n in names if shapes[n][0] == hidden and n not in outputs and 4 * shapes[n][1] >= hidden]
    return tuple(inputs), tuple(outputs)


def _role(inputs: tuple[str, ...], names: list[str], leaves: tuple[str, ...]) -> str | None:
    """The projection of a role among the attention block's linear layers `names`, by leaf name (any case);
    a lone input projection (fused qkv) plays every role."""
    if len(inputs) == 1:
        return inputs[0]
    for leaf in leaves:
        for name in names:
            if leaf in [part.lower() for part in name.split(".")[-2:]]:  # Moshi: q_proj.linear
                return name
    return None


def _static_structure(model: nn.Module, skip=frozenset()) -> Structure:
    hidden = _hidden_size(model)
    head = _head_names(model)
    layers = _decoder_layers(model, head)
    attention, mlp, layer_of = [], [], {}
    for path in layers:
        layer = model.get_submodule(path)
        linears = _named_linears(layer, path, skip)
        layer_of.update(dict.fromkeys(linears, path))
        attn_path = _block_path(layer, path, _ATTENTION_CLASS)
        attn = {}
        if attn_path is not None:
            attn = {n: m for n, m in linears.items() if n.startswith(attn_path + ".")}
            inputs, outputs = _split(attn, hidden, last_writer=True)
            query, value = _role(inputs, list(attn), QUERY_NAMES), _role(inputs, list(attn), VALUE_NAMES)
            attention.append(AttentionBlock(attn_path, inputs, outputs[0] if outputs else None, query, value))
        # The MLP: a submodule whose class says so; else, beside an attention block, the layer's other linear
        # layers (OPT's fc1/fc2, BERT's intermediate/output); a layer without either (Mamba) has none.
        mlp_path = _block_path(layer, path, _MLP_CLASS, skip=attn_path)
        if mlp_path is not None:
            rest = {n: m for n, m in linears.items() if n.startswith(mlp_path + ".")}
        elif attn_path is not None:
            cross = {n for n in linears if any(_CROSS.search(part) for part in n[len(path) + 1 :].split("."))}
            rest = {n: m for n, m in linears.items() if n not in attn and n not in cross}
        else:
            rest = {}
        if rest:
            mlp.append(MLPBlock(*_split(rest, hidden)))
    return Structure(
        model_class=type(model).__name__,
        layers=layers,
        attention=tuple(attention),
        mlp=tuple(mlp),
        linears=tuple(_named_linears(model, "", skip)),
        head=head,
        layer_of=layer_of,
    )


# ------------------------------------------------------------------------------------------ the trace


class _Recorder:
    """What the probe forward saw: each linear layer's input tensor, each attention call's shapes."""

    def __init__(self):
        self.inputs: dict[str, int] = {}
        self.keep: list = []  # keeps the input tensors alive, so their ids stay unique
        self.attention: dict[int, tuple[int, int, tuple[str, ...]]] = {}
        self.failures: list[str] = []
        self.not_linear: set[str] = set()


_RECORDER: _Recorder | None = None
_FEATURES = ("softcap", "s_aux", "sinks", "sliding_window")


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of the traced replica: records the call, then runs transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _RECORDER is not None:
        used = tuple(f for f in _FEATURES if kwargs.get(f) is not None)
        _RECORDER.attention[id(module)] = (int(key.shape[1]), int(query.shape[-1]), used)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("softcap", "s_aux", "sinks")}
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _no_mask(*args, **kwargs):
    """The traced replica's mask function: none (sdpa then applies causality; nothing data-dependent)."""
    return None


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if PROBE not in AttentionInterface._global_mapping:
        AttentionInterface.register(PROBE, _probe_attention)
        AttentionMaskInterface.register(PROBE, _no_mask)


def _guarded(module: nn.Module) -> None:
    """Makes `module` (in the replica) return its first input when its forward fails on the meta device,
    so that one op without a meta kernel does not end the trace of the layers after it."""
    forward = module.forward

    def run(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (any failure: the trace goes on with what it has)
            _RECORDER.failures.append(f"{type(module).__name__}: {type(exc).__name__}")
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                raise
            return x

    module.forward = run


def _trace(model: nn.Module, structure: Structure) -> tuple[_Recorder, dict] | None:
    """Runs a meta-device replica of `model` (built from its config) on 4 tokens; returns what the forward
    saw and the replica's module names (by id), or None (structure.trace says why)."""
    global _RECORDER
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        structure.trace = f"{type(model).__name__} is not a transformers PreTrainedModel"
        return None
    recorder = _Recorder()
    try:
        _register_probe()
        config = copy.deepcopy(model.config)
        with torch.device("meta"):
            replica = type(model)(config)
        replica.eval()
        replica.set_attn_implementation(PROBE)
    except Exception as exc:  # noqa: BLE001
        structure.trace = f"no meta replica ({type(exc).__name__}: {str(exc)[:120]})"
        return None
    names = {id(m): n for n, m in replica.named_modules()}
    hooks = []
    for name, module in replica.named_modules():
        if isinstance(module, LINEAR_TYPES):
            width = _shape(module)[1]

            def record(mod, args, kwargs, name=name):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(x, torch.Tensor) and name not in recorder.inputs:
                    recorder.inputs[name] = id(x)
                    recorder.keep.append(x)

            def check(mod, args, out, name=name, width=width):
                if not isinstance(out, torch.Tensor) or out.shape[-1] != width:
                    recorder.not_linear.add(name)

            hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
            hooks.append(module.register_forward_hook(check))
    for path in structure.layers:
        layer = replica.get_submodule(path)
        _guarded(layer)
        for child in layer.children():
            _guarded(child)
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    _RECORDER = recorder
    try:
        with torch.no_grad():
            replica(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        structure.trace = (
            "complete" if not recorder.failures else "partial: " + "; ".join(recorder.failures[:3])
        )
    except Exception as exc:  # noqa: BLE001
        structure.trace = f"stopped ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        _RECORDER = None
        for hook in hooks:
            hook.remove()
    return recorder, names


def _apply_trace(structure: Structure, recorder: _Recorder, names: dict) -> None:
    """Fills in the groups and the attention blocks' interface use from what the traced forward saw."""
    seen = {names[k]: v for k, v in recorder.attention.items() if k in names}
    order = list(names.values())
    structure.attention_calls = {p: seen[p] for p in sorted(seen, key=order.index)}
    for block in structure.attention:
        inside = [p for p in seen if p == block.path or p.startswith(block.path + ".")]
        if len(inside) == 1:
            block.interface = inside[0]
    by_input: dict[int, list[str]] = {}
    for name, key in recorder.inputs.items():
        if name not in recorder.not_linear:
            by_input.setdefault(key, []).append(name)
    structure.groups = tuple(
        tuple(names)
        for names in by_input.values()
        if len(names) > 1 and all(n in structure.layer_of for n in names)
    )


def _fallback_groups(structure: Structure) -> tuple[tuple[str, ...], ...]:
    """Each block's input projections, where the trace could not tell."""
    blocks = [b.inputs for b in structure.attention] + [b.inputs for b in structure.mlp]
    return tuple(inputs for inputs in blocks if len(inputs) > 1)


def read_structure(model: nn.Module) -> Structure:
    """The model's Structure (computed once per model object, then kept on it)."""
    cached = model.__dict__.get(_CACHE_ATTR)
    if isinstance(cached, Structure) and cached.model_class == type(model).__name__:
        return cached
    structure = _static_structure(model)
    if structure.layers:
        traced = _trace(model, structure)
        if traced is not None:
            recorder, names = traced
            if recorder.not_linear:
                trace, structure = structure.trace, _static_structure(model, frozenset(recorder.not_linear))
                structure.trace = trace
            _apply_trace(structure, recorder, names)
        traced = {n for group in structure.groups for n in group}
        untraced = [g for g in _fallback_groups(structure) if not traced.intersection(g)]
        if structure.trace != "complete":
            structure.groups = structure.groups + tuple(untraced)
    model.__dict__[_CACHE_ATTR] = structure
    return structure


def describe(structure: Structure) -> str:
    """A few lines naming what was found (for error messages)."""
    leaves = sorted({structure.relative(n) for n in structure.linears})
    return (
        f"{structure.model_class}: {len(structure.layers)} decoder layers"
        f"{' at ' + structure.layers[0].rpartition('.')[0] if structure.layers else ''}, "
        f"{len(structure.attention)} attention blocks, {len(structure.mlp)} MLPs; linear layers {leaves[:24]}"
        f"{'...' if len(leaves) > 24 else ''}"
    )
