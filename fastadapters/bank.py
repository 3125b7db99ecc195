"""AdapterBank: many adapters over one copy of a HuggingFace model; one adapter (or none) per batch row.

    bank = AdapterBank(model)
    bank.load("math", "adapters/math")           # a fastadapters folder (any adapter type) or a PEFT LoRA one
    bank.add("chat", state_dict, LoraConfig(...))
    logits = bank.forward(input_ids, attention_mask, adapter_names=["math", None, "chat"])
    tokens = bank.generate(input_ids, attention_mask, adapter_names=[...], max_new_tokens=32)

Adapter types, mixed freely in one batch: LoRA (any ranks), bottleneck adapters (series "AdapterH"/"AdapterP"
and parallel, any sizes and activations) and prefix tuning (plain or folded prefix_projection).

How it works. The bank wraps the linear layers its adapters target, in place (the base weights are never
copied), with `BankLinear`, and routes attention through the prefix-attention op once a prefix adapter is
loaded. Per layer it keeps every adapter stacked: LoRA along the rank (fastadapters.ops.multi_lora_linear's
layout, no padding to the largest rank; linear layers that read one input, q/k/v and gate/up, form one unit
whose shrink reads x once), bottleneck adapters along the bottleneck (multi_bottleneck_adapter), prefixes
as [A, Hkv, P, D] (prefix_attention's per-row adapter ids). A request (forward or generate) sorts its rows by
adapter and builds one AdapterSchedule per input shape (one for the prefill, one shared by every decode
step); each wrapped layer then runs one op per adapter kind for the whole batch. Outside a request the
wrapped model computes the base model.

Threads. The stacked weights live in an immutable snapshot. load/add/remove build a new snapshot
(copy-on-write) under a lock and swap it in atomically; a request takes the snapshot current when it
starts and keeps it to the end, so loading and removing adapters while other threads run forward/generate
is safe, and a request in flight keeps the weights it started with. Requests may run in several threads
at once (the per-request context is thread-local). Inference only: the ops have no backward.
"""

import inspect
import os
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fastadapters import io, ops
from fastadapters.config import BottleneckConfig, LoraConfig, PrefixConfig
from fastadapters.families import (
    LINEAR_TYPES,
    PLACEMENTS,
    attention_paths,
    base_weight,
    bottleneck_placement,
    lora_targets,
    shared_input_groups,
)
from fastadapters.kernels import ACTIVATIONS
from fastadapters.ops.multi_lora import (
    AdapterSchedule,
    adapter_schedule,
    run_bottleneck_unchecked,
    run_unchecked,
)
from fastadapters.patch import check_state, set_submodule
from fastadapters.prefix import ENCODER_ATTR, PREFIX_ATTR, build_prefix, own_config, register_attention

ATTENTION_NAME = "fastadapters_bank"
BANK_ATTR = "_fastadapters_bank"
SUPPORTED = (LoraConfig, BottleneckConfig, PrefixConfig)


def _cast_to(like) -> dict:
    """device= and dtype= of a tensor, or of a linear layer's weight."""
    w = like if isinstance(like, Tensor) else like.weight
    return dict(device=w.device, dtype=w.dtype)


# --------------------------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class _Adapter:
    """One adapter as loaded, its tensors already in the model's dtype and device.

    lora: module path -> (A [r, d_in], B [d_out, r]); bottleneck: module path -> (placement, down [b, a_in],
    up [a_out, b], scale, activation code); prefix: attention module path -> (key, value) [Hkv, P, D].
    """

    name: str
    config: object
    lora: dict = field(default_factory=dict)
    bottleneck: dict = field(default_factory=dict)
    prefix: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _LoraUnit:
    """The stacked LoRA of modules that read one input (the op's grouped layout; one member if alone)."""

    members: tuple  # module paths
    bank_a: Tensor
    bank_bs: tuple
    ranks: list  # flattened member-major: ranks[m * n + a]
    scales: list


@dataclass(frozen=True)
class _BottleneckBank:
    """The bottleneck adapters at one placement on one module (multi_bottleneck_adapter's layout)."""

    bank_down: Tensor
    bank_up: Tensor
    sizes: list
    scales: list
    activations: list  # codes into fastadapters.kernels.ACTIVATIONS
    users: frozenset  # adapter indices with a non-empty bottleneck here


@dataclass(frozen=True)
class _PrefixStack:
    """The prefixes of one length P at one attention module: key/value [A_P, Hkv, P, D]."""

    key: Tensor
    value: Tensor
    rows: dict  # adapter index -> its row of key/value


@dataclass(frozen=True)
class _State:
    """An immutable snapshot of the bank: what one request runs with from start to end."""

    names: tuple = ()
    adapters: dict = field(default_factory=dict)  # name -> _Adapter
    units: dict = field(default_factory=dict)  # module path -> (_LoraUnit, member index)
    bottlenecks: dict = field(default_factory=dict)  # module path -> {placement: _BottleneckBank}
    prefixes: dict = field(default_factory=dict)  # attention module path -> tuple of _PrefixStack

    @property
    def index(self) -> dict:
        return {name: i for i, name in enumerate(self.names)}


class _Request:
    """One forward/generate call: its snapshot, its rows' adapters and what is derived from them."""

    def __init__(self, state: _State, adapter_ids: Tensor):
        self.state = state
        self.adapter_ids = adapter_ids  # [batch] int64: each row's adapter index into state.names, −1: none
        self.present = frozenset(int(a) for a in adapter_ids.tolist() if a >= 0)
        self.schedules: dict = {}
        self.stack_ids: dict = {}
        self.pending: dict = {}

    def expanded(self, rows: int, device) -> Tensor:
        batch = self.adapter_ids.shape[0]
        if rows % batch:
            raise RuntimeError(f"AdapterBank: a layer saw {rows} rows, the request has {batch} adapter names")
        # generate() repeats each row for beams / return sequences (repeat_interleave): so do the ids.
        return self.adapter_ids.repeat_interleave(rows // batch).to(device)

    def schedule(self, x: Tensor) -> AdapterSchedule:
        rows = x.shape[0]
        per_row = x.shape[:-1].numel() // max(rows, 1)
        key = (rows, per_row, x.device)
        sched = self.schedules.get(key)
        if sched is None:
            ids = self.expanded(rows, x.device)[:, None].expand(rows, per_row)  # rows: the schedule sees them
            sched = self.schedules[key] = adapter_schedule(ids, len(self.state.names))
        return sched

    def prefix_adapter_ids(self, stack: _PrefixStack, rows: int, device) -> Tensor | None:
        """[rows] int64: each row's prefix in the stack (prefix_attention's adapter ids, −1: none), or None
        when no row has one."""
        key = (id(stack), rows, device)
        if key not in self.stack_ids:
            if not self.present & stack.rows.keys():
                self.stack_ids[key] = None
            else:
                table = torch.full((len(self.state.names) + 1,), -1, dtype=torch.int64)
                for a, row in stack.rows.items():
                    table[a] = row
                self.stack_ids[key] = table[self.expanded(rows, "cpu")].to(
                    device
                )  # id −1 reads the last entry
        return self.stack_ids[key]


def _version(x: Tensor):
    try:
        return x._version
    except RuntimeError:  # inference tensors track no version
        return None


# --------------------------------------------------------------------------------------------- layers


class BankLinear(nn.Module):
    """A linear layer (nn.Linear or HF Conv1D) served by an AdapterBank. Inside a bank request every row
    gets its own adapter (LoRA, bottleneck on the input / beside / on the output; one op per kind for the
    whole batch); outside one, the base layer."""

    def __init__(self, base_layer: nn.Module, bank: "AdapterBank", name: str):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # A plain attribute (not a submodule): the bank is not part of the model's state.
        self.__dict__["_bank"] = bank

    def base_weight(self) -> Tensor:
        """The frozen weight as [d_out, d_in] (a transposed view for Conv1D)."""
        return base_weight(self.base_layer)

    def forward(self, x: Tensor) -> Tensor:
        req = self._bank._request()
        if req is None:
            return self.base_layer(x)
        unit = req.state.units.get(self.name)
        banks = req.state.bottlenecks.get(self.name, {})
        banks = {placement: b for placement, b in banks.items() if b.users & req.present}
        if unit is None and not banks:
            return self.base_layer(x)
        h = x
        if "mh" in banks:  # series adapter on the input
            h = _bottleneck(banks["mh"], x, req)
        y = self.base_layer(h) if unit is None else self._lora(unit, h, req)
        if "parallel" in banks:
            y = _bottleneck(banks["parallel"], h, req, residual=y)
        if "output" in banks:  # series adapter on the output
            y = _bottleneck(banks["output"], y, req)
        return y

    def _lora(self, hit, x: Tensor, req: _Request) -> Tensor:
        unit, member = hit
        stashed = req.pending.pop(self.name, None)
        if stashed is not None and stashed[0] is x and stashed[1] == _version(x):
            return stashed[2]
        layers = [self._bank._wrapped[name] for name in unit.members]
        dtype = unit.bank_a.dtype
        ys = run_unchecked(
            x.to(dtype),
            [layer.base_weight().to(dtype) for layer in layers],
            [None if layer.base_layer.bias is None else layer.base_layer.bias.to(dtype) for layer in layers],
            unit.bank_a,
            list(unit.bank_bs),
            unit.ranks,
            unit.scales,
            req.schedule(x),
        )
        if len(ys) > 1:
            version = _version(x)
            for m, (name, y) in enumerate(zip(unit.members, ys)):
                if m != member:
                    req.pending[name] = (x, version, y.to(x.dtype))
        return ys[member].to(x.dtype)


def _bottleneck(bank: _BottleneckBank, h: Tensor, req: _Request, residual: Tensor | None = None) -> Tensor:
    dtype = bank.bank_down.dtype
    out = run_bottleneck_unchecked(
        h.to(dtype),
        bank.bank_down,
        bank.bank_up,
        bank.sizes,
        bank.scales,
        bank.activations,
        req.schedule(h),
        None if residual is None else residual.to(dtype),
    )
    return out.to(h.dtype)


def bank_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function of a bank's model (registered as "fastadapters_bank"): each row attends to
    its own adapter's prefix (prefix_attention's per-row adapter ids), or to none. Same contract as
    fastadapters.prefix.prefix_attention_forward; returns ([B, S, Hq, D], None)."""
    if dropout and module.training:
        raise NotImplementedError(f"attention dropout {dropout} is not supported by AdapterBank")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None and attention_mask.dim() == 4:
        causal = False  # transformers' 4-D masks carry the causal pattern themselves
    hook = module.__dict__.get(BANK_ATTR)
    req = None if hook is None else hook[0]._request()
    if getattr(req, "attend", None) is not None:  # a packed step of the serving engine: its paged attention
        return req.attend(module, hook[1], query, key, value, scaling, kwargs), None
    stacks = () if req is None else req.state.prefixes.get(hook[1], ())
    rows, dev = query.shape[0], query.device
    used = [(st, ids) for st in stacks if (ids := req.prefix_adapter_ids(st, rows, dev)) is not None]

    def attend(q, k, v, mask, prefix_k, prefix_v, adapter_ids):
        return ops.prefix_attention(
            q, k, v, prefix_k, prefix_v, attention_mask=mask, causal=causal, scale=scaling,
            adapter_ids=adapter_ids,
        )  # fmt: skip

    if len(used) <= 1:
        if used:
            stack, adapter_ids = used[0]
            prefix_k, prefix_v = stack.key.to(query.dtype), stack.value.to(query.dtype)
        else:
            # No row has a prefix: the op with one dummy prefix that no row selects is plain attention.
            Hkv, D = key.shape[1], key.shape[3]
            prefix_k = prefix_v = query.new_zeros(1, Hkv, 1, D)
            adapter_ids = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        out = attend(query, key, value, attention_mask, prefix_k, prefix_v, adapter_ids)
        return out.transpose(1, 2), None
    # Prefixes of different lengths in one batch: one call per length, on its rows.
    out = torch.empty_like(query)
    rest = torch.ones(rows, dtype=torch.bool, device=dev)
    calls = [(st.key, st.value, ids, ids >= 0) for st, ids in used]
    for *_, pick in calls:
        rest &= ~pick
    Hkv, D = key.shape[1], key.shape[3]
    calls.append((query.new_zeros(1, Hkv, 1, D), query.new_zeros(1, Hkv, 1, D), None, rest))
    for prefix_k, prefix_v, adapter_ids, pick in calls:
        idx = pick.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        mask = attention_mask
        if mask is not None and mask.shape[0] == rows and rows > 1:
            mask = mask[idx]
        none = torch.full((idx.numel(),), -1, dtype=torch.int64, device=dev)
        sub = none if adapter_ids is None else adapter_ids[idx]
        out[idx] = attend(query[idx], key[idx], value[idx], mask, prefix_k.to(query.dtype),
                          prefix_v.to(query.dtype), sub)  # fmt: skip
    return out.transpose(1, 2), None


# --------------------------------------------------------------------------------------------- the bank


def _unpermute(obj, inverse: Tensor, batch: int):
    """Puts the rows of generate()'s output (a tensor, or a ModelOutput/tuple of them) back in input order."""
    if isinstance(obj, Tensor):
        if obj.dim() == 0 or obj.shape[0] % batch:
            return obj
        rows = obj.shape[0] // batch
        return obj.reshape(batch, rows, *obj.shape[1:])[inverse.to(obj.device)].reshape(obj.shape)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_unpermute(v, inverse, batch) for v in obj)
    if isinstance(obj, dict):  # ModelOutput is a dict subclass
        for key in list(obj.keys()):
            if key not in ("past_key_values", "beam_indices"):
                obj[key] = _unpermute(obj[key], inverse, batch)
        return obj
    return obj


class AdapterBank:
    """Many adapters stacked per layer over one copy of `model` (modified in place: the linear layers the
    adapters target are wrapped, and attention is routed through the prefix op once a prefix adapter is
    loaded; outside a request the model computes the base model).

    Methods: load(name, path), add(name, state, config), remove(name), names(),
    forward(input_ids, attention_mask=None, adapter_names=...) -> logits [B, S, vocab],
    generate(input_ids, attention_mask=None, adapter_names=..., **generate_kwargs) -> generate()'s output.
    adapter_names has one entry per row: a loaded adapter's name, or None for the base model.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a HF causal LM), got {type(model).__name__}")
        if getattr(model, "fastadapters_config", None) is not None:
            raise ValueError("model already has a fastadapters adapter applied; pass the base model")
        if getattr(model, "fastadapters_bank", None) is not None:
            raise ValueError("model is already served by an AdapterBank; use that bank")
        self.model = model
        model.fastadapters_bank = self
        self._lock = threading.RLock()
        self._local = threading.local()
        self._state = _State()
        self._wrapped: dict[str, BankLinear] = {}
        self._attention_routed = False
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params

    # ----------------------------------------------------------------------------------- adapters

    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        return list(self._state.names)

    def load(self, name: str, path: str) -> None:
        """Loads an adapter folder: fastadapters' format (fastadapters_config.json; LoRA, bottleneck or
        prefix) or PEFT's LoRA format (adapter_config.json). Everything is read and checked before the
        bank changes: a bad file leaves it as it was."""
        config, state = self.read(path)
        self.add(name, state, config, source=path)

    def read(self, path: str) -> tuple:
        """(config, state dict) of an adapter folder (fastadapters' or PEFT's LoRA format), its base model
        checked against this bank's; the bank does not change."""
        if os.path.isfile(os.path.join(path, io.CONFIG_NAME)):
            config, state, base = io.read_adapter(path)
            io.check_base(self.model, base, path)
        elif os.path.isfile(os.path.join(path, io.PEFT_CONFIG_NAME)):
            config, state = io.read_peft(path)
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"adapter directory not found: {path}")
        else:
            raise FileNotFoundError(
                f"{path} holds neither {io.CONFIG_NAME} (fastadapters) nor {io.PEFT_CONFIG_NAME} (PEFT LoRA)"
            )
        return config, state

    def add(self, name: str, state: dict, config, source: str = "state") -> None:
        """Adds an adapter from memory: `state` is its state dict as fastadapters.save writes it (keys are
        module paths + '.lora_A.weight', '.adapter_down.weight', '.fastadapters_prefix.key', …) and
        `config` its LoraConfig, BottleneckConfig or PrefixConfig. The state must hold exactly the tensors
        that applying `config` to the model would create (fastadapters.patch.check_state, as io.load)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
        if not isinstance(config, SUPPORTED):
            raise TypeError(
                f"AdapterBank serves {[c.__name__ for c in SUPPORTED]} adapters; got {type(config).__name__} "
                f"for {name!r}"
            )
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
        with self._lock:
            if name in self._state.adapters:
                raise ValueError(f"adapter {name!r} is already loaded; remove it first")
            adapter = self._adapter(name, state, config, source)
            # Everything is checked: from here on nothing can fail half-way.
            self._wrap([*adapter.lora, *adapter.bottleneck])
            if adapter.prefix:
                self._route_attention(adapter.prefix)
            adapters = dict(self._state.adapters)
            adapters[name] = adapter
            self._state = self._build(tuple(self._state.names) + (name,), adapters)

    def remove(self, name: str) -> None:
        """Removes an adapter; requests already running keep it until they finish."""
        with self._lock:
            if name not in self._state.adapters:
                raise ValueError(f"unknown adapter {name!r}; loaded adapters: {list(self._state.names)}")
            adapters = {k: v for k, v in self._state.adapters.items() if k != name}
            self._state = self._build(tuple(n for n in self._state.names if n != name), adapters)

    # ----------------------------------------------------------------------------------- checks

    def _adapter(self, name: str, state: dict, config, source: str) -> _Adapter:
        """The adapter as the bank keeps it (tensors in the model's dtype and device), after check_state:
        exactly the keys, float tensors and shapes that applying `config` to this model would create."""
        where = f"adapter {name!r} ({source})"
        if isinstance(config, PrefixConfig):
            try:
                route = attention_paths(self.model)[1]
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if route != "registry":
                raise ValueError(
                    f"{where}: AdapterBank serves prefix adapters on models whose attention goes through "
                    f"transformers' attention interface, not {type(self.model).__name__}"
                )
        check_state(self.model, config, state, where)
        if isinstance(config, LoraConfig):
            lora = {}
            for path, module in sorted(lora_targets(self.model, config).items()):
                a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
                lora[path] = (a.to(**_cast_to(module)), b.to(**_cast_to(module)))
            return _Adapter(name, config, lora=lora)
        if isinstance(config, BottleneckConfig):
            bottleneck = {}
            act = ACTIVATIONS.index(config.non_linearity)
            for path, (module, placement) in sorted(bottleneck_placement(self.model, config).items()):
                learned = state.get(f"{path}.adapter_scaling")
                scale = float(config.scaling) if learned is None else float(learned.reshape(()))
                cast = _cast_to(module)
                down, up = state[f"{path}.adapter_down.weight"], state[f"{path}.adapter_up.weight"]
                bottleneck[path] = (placement, down.to(**cast), up.to(**cast), scale, act)
            return _Adapter(name, config, bottleneck=bottleneck)
        return _Adapter(name, config, prefix=self._prefix_key_values(config, state))

    def _prefix_key_values(self, config: PrefixConfig, state: dict) -> dict:
        """attention path -> (key, value) [Hkv, P, D] in the model's dtype; a prefix_projection encoder is
        run (folded) once here."""
        paths, _ = attention_paths(self.model)
        cast = _cast_to(next(self.model.parameters()))
        if not config.prefix_projection:
            return {
                path: tuple(state[f"{path}.{PREFIX_ATTR}.{part}"].to(**cast) for part in ("key", "value"))
                for path in paths
            }
        encoder = build_prefix(self.model, config, paths, "cpu", torch.float32)[ENCODER_ATTR]
        start = ENCODER_ATTR + "."
        encoder.load_state_dict({k[len(start) :]: v.float() for k, v in state.items() if k.startswith(start)})
        with torch.no_grad():
            kv = [encoder.layer_key_value(i, torch.float32) for i in range(len(paths))]
        return {path: (key.to(**cast), value.to(**cast)) for path, (key, value) in zip(paths, kv)}

    # ----------------------------------------------------------------------------------- model changes

    def _wrap(self, paths: list[str]) -> None:
        """Wraps the layers at `paths`, and their shared-input siblings (one unit), in BankLinear."""
        modules = dict(self.model.named_modules())
        todo = set(paths)
        for path in paths:
            for group in shared_input_groups(self.model):
                if path in group:
                    todo.update(p for p in group if p in modules)
        for path in sorted(todo):
            module = modules[path]
            if path in self._wrapped or not isinstance(module, LINEAR_TYPES):
                continue
            wrapper = BankLinear(module, self, path)
            set_submodule(self.model, path, wrapper)
            self._wrapped[path] = wrapper

    def _route_attention(self, paths) -> None:
        """Points the attention layers at the bank (once; never undone, so requests in flight stay valid)."""
        for path in paths:
            module = self.model.get_submodule(path)
            if BANK_ATTR not in module.__dict__:
                object.__setattr__(module, BANK_ATTR, (self, path))
        if not self._attention_routed:
            register_attention(ATTENTION_NAME, bank_attention_forward)
            own_config(self.model)  # other models built from the same config object keep their attention
            self.model.set_attn_implementation(ATTENTION_NAME)
            self._attention_routed = True

    def _units(self, adapters: dict) -> list[tuple]:
        """The wrapped layers grouped into units: shared-input siblings together (unless a series adapter
        changes one member's input), the others alone."""
        with_input_adapter = {
            path for a in adapters.values() for path, spec in a.bottleneck.items() if spec[0] == "mh"
        }
        seen, units = set(), []
        groups = shared_input_groups(self.model)
        for path in sorted(self._wrapped):
            if path in seen:
                continue
            members = (path,)
            for group in groups:
                if path in group:
                    members = tuple(p for p in group if p in self._wrapped)
            if len(members) > 1 and with_input_adapter.intersection(members):
                members = (path,)
            seen.update(members)
            units.append(members)
        return units

    def _build(self, names: tuple, adapters: dict) -> _State:
        """A new snapshot: every adapter stacked per layer (new tensors: copy on write)."""
        order = [adapters[n] for n in names]
        units = {}
        for members in self._units(adapters):
            if not any(m in a.lora for a in order for m in members):
                continue
            k = len(members)
            ranks = [[0] * len(names) for _ in range(k)]
            scales = [[1.0] * len(names) for _ in range(k)]
            a_rows, b_rows = [], [[] for _ in range(k)]
            for i, adapter in enumerate(order):
                for m, path in enumerate(members):
                    if path in adapter.lora:
                        a, b = adapter.lora[path]
                        ranks[m][i], scales[m][i] = a.shape[0], float(adapter.config.scale)
                        a_rows.append(a)
                        b_rows[m].append(b.T)
            layer = self._wrapped[members[0]]
            w = layer.base_layer.weight
            bank_a = (
                torch.cat(a_rows).contiguous() if a_rows else w.new_empty(0, layer.base_weight().shape[1])
            )
            bank_bs = tuple(
                torch.cat(rows).contiguous()
                if rows
                else w.new_empty(0, self._wrapped[p].base_weight().shape[0])
                for p, rows in zip(members, b_rows)
            )
            flat_ranks = [r for mr in ranks for r in mr]
            unit = _LoraUnit(members, bank_a, bank_bs, flat_ranks, [s for ms in scales for s in ms])
            for m, path in enumerate(members):
                units[path] = (unit, m)
        bottlenecks: dict[str, dict] = {}
        for path in sorted({p for a in order for p in a.bottleneck}):
            for placement in PLACEMENTS:
                entries = [(i, a.bottleneck.get(path)) for i, a in enumerate(order)]
                entries = [(i, spec) for i, spec in entries if spec is not None and spec[0] == placement]
                if not entries:
                    continue
                sizes, scales, acts = [0] * len(names), [1.0] * len(names), [0] * len(names)
                for i, (_, down, _, scale, act) in entries:
                    sizes[i], scales[i], acts[i] = down.shape[0], scale, act
                bank = _BottleneckBank(
                    torch.cat([spec[1] for _, spec in entries]).contiguous(),
                    torch.cat([spec[2].T for _, spec in entries]).contiguous(),
                    sizes,
                    scales,
                    acts,
                    frozenset(i for i, _ in entries),
                )
                bottlenecks.setdefault(path, {})[placement] = bank
        prefixes = {}
        for path in sorted({p for a in order for p in a.prefix}):
            by_length: dict[int, list] = {}
            for i, adapter in enumerate(order):
                if path in adapter.prefix:
                    key, value = adapter.prefix[path]
                    by_length.setdefault(key.shape[1], []).append((i, key, value))
            prefixes[path] = tuple(
                _PrefixStack(
                    torch.stack([k for _, k, _ in items]),
                    torch.stack([v for _, _, v in items]),
                    {i: row for row, (i, _, _) in enumerate(items)},
                )
                for _, items in sorted(by_length.items())
            )
        return _State(names, adapters, units, bottlenecks, prefixes)

    # ----------------------------------------------------------------------------------- requests

    def _request(self) -> _Request | None:
        return getattr(self._local, "request", None)

    def _begin(self, input_ids: Tensor, adapter_names, attention_mask=None) -> tuple[_Request, Tensor | None]:
        """The request (the current snapshot, the rows' adapter ids) and the row order sorting them."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must hold integer token ids (int64 or int32), got dtype {input_ids.dtype}"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(
                    f"attention_mask must be a torch.Tensor of shape {tuple(input_ids.shape)} (like "
                    f"input_ids) or None, got {type(attention_mask).__name__}"
                )
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have input_ids' shape {tuple(input_ids.shape)} (batch, seq), got "
                    f"shape {tuple(attention_mask.shape)}"
                )
            if attention_mask.dtype.is_complex:
                raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
        batch = input_ids.shape[0]
        if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list with one name (or None) per row, got {adapter_names!r}"
            )
        if len(adapter_names) != batch:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows; give one per "
                "row (None for the base model)"
            )
        for i, n in enumerate(adapter_names):
            if n is not None and not isinstance(n, str):
                raise TypeError(
                    f"adapter_names[{i}] must be an adapter name (str) or None, got "
                    f"{type(n).__name__} {n!r:.60}"
                )
        state = self._state
        index = state.index
        unknown = sorted({n for n in adapter_names if n is not None and n not in index}, key=str)
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded adapters: {list(state.names)}")
        adapter_ids = torch.tensor([-1 if n is None else index[n] for n in adapter_names], dtype=torch.int64)
        order = None
        if batch > 1 and bool((adapter_ids[1:] < adapter_ids[:-1]).any()):
            # Rows sorted by adapter make every adapter's tokens one contiguous range in every layer.
            order = torch.sort(adapter_ids, stable=True).indices
            adapter_ids = adapter_ids[order]
        return _Request(state, adapter_ids), order

    def _run(self, req: _Request, fn):
        outer = self._request()
        self._local.request = req
        try:
            with torch.no_grad():
                return fn()
        finally:
            self._local.request = outer

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, adapter_names=None) -> Tensor:
        """Logits [B, S, vocab] with row i run through adapter adapter_names[i] (None: the base model).

        input_ids: [B, S]; attention_mask: [B, S] or None (left padding: positions then count real tokens,
        as generate() does).
        """
        req, order = self._begin(input_ids, adapter_names, attention_mask)
        kwargs = {}
        if order is not None:
            input_ids = input_ids[order.to(input_ids.device)]
            attention_mask = (
                None if attention_mask is None else attention_mask[order.to(attention_mask.device)]
            )
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self._takes_position_ids:
                position_ids = attention_mask.long().cumsum(-1) - 1
                kwargs["position_ids"] = position_ids.masked_fill_(attention_mask == 0, 1)
        logits = self._run(req, lambda: self.model(input_ids=input_ids, use_cache=False, **kwargs).logits)
        if order is not None:
            logits = logits[torch.argsort(order).to(logits.device)]
        return logits

    __call__ = forward

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, adapter_names=None, **generate_kwargs
    ):
        """model.generate (its own KV cache and decoding) with row i run through adapter adapter_names[i].

        input_ids: [B, S] (left-padded with attention_mask for rows of different lengths). Tensor keyword
        arguments with B rows are reordered with the rows; the output comes back in input order.
        """
        req, order = self._begin(input_ids, adapter_names, attention_mask)
        batch = input_ids.shape[0]
        if order is not None:
            input_ids = input_ids[order.to(input_ids.device)]
            if attention_mask is not None:
                attention_mask = attention_mask[order.to(attention_mask.device)]
            for key, value in generate_kwargs.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                    generate_kwargs[key] = value[order.to(value.device)]
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        out = self._run(req, lambda: self.model.generate(input_ids=input_ids, **generate_kwargs))
        if order is not None:
            out = _unpermute(out, torch.argsort(order), batch)
        return out
