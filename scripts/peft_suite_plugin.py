"""pytest plugin for scripts/peft_suite.sh: runs PEFT's own tests, plain or with every PEFT tuner accelerated.

Loaded with `-p peft_suite_plugin` (scripts/ on PYTHONPATH). Environment:
    FA_SUITE_MODE   "plain" or "accelerated": the latter calls fastadapters.accelerate on every tuner PEFT
                    builds (BaseTuner.__init__: get_peft_model, PeftModel.from_pretrained, LoraModel(...),
                    inject_adapter_in_model), and counts every forward call of a PEFT LoRA-family layer
                    (a subclass of peft.tuners.lora.LoraLayer), and whether a fastadapters op ran in it
    FA_SUITE_OUT    folder for outcomes.json (controller) and counts-<worker>.json (each process)
    FA_SUITE_EVERY  keep every N-th collected test (N >= 1; the same tests in both runs)
"""

import collections
import functools
import json
import os
import threading

import pytest

MODE = os.environ.get("FA_SUITE_MODE", "plain")
OUT = os.environ.get("FA_SUITE_OUT", ".")
EVERY = int(os.environ.get("FA_SUITE_EVERY", "1"))

_outcomes: dict[str, str] = {}
# layer type -> {"calls": n, "fused": n, "unfused_why": {reason: n}}
_counts: dict = collections.defaultdict(
    lambda: {"calls": 0, "fused": 0, "unfused_why": collections.Counter()}
)
_local = threading.local()


def _why_unfused(layer, x, args, kwargs) -> str:
    """Why a LoRA-family call took PEFT's path (for the report)."""
    from peft.tuners.lora import layer as peft_lora

    from fastadapters import peft_accel

    if type(layer) not in peft_accel._ACCELERATED.values():
        if type(layer) in peft_accel._ACCELERATED:
            reason = peft_accel._why_not(layer)
            return f"not accelerated: {reason}" if reason else "not accelerated"
        return "layer type has no fused path"
    if kwargs.get("adapter_names") is not None:
        return "adapter_names batch"
    if args or kwargs:
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    adapters = layer.lora_embedding_A if isinstance(layer, peft_lora.Embedding) else layer.lora_A
    active = [a for a in layer.active_adapters if a in adapters]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    if active[0] in layer.lora_variant or layer.use_dora.get(active[0], False):
        return "DoRA or a LoRA variant"
    return "other (hooks, dtypes, base layer)"


def _type_name(cls) -> str:
    """'lora.Linear' for PEFT's LoRA layers (an accelerated layer counts as PEFT's class),
    'lora.bnb.Linear4bit' for those in other files of peft.tuners.lora, else the module path (tuners built
    on LoraLayer)."""
    if cls.__name__.startswith("AcceleratedLora"):
        return "lora." + cls.__name__.removeprefix("AcceleratedLora")
    module = cls.__module__.removeprefix("peft.tuners.")
    if module == "lora.layer":
        return f"lora.{cls.__name__}"
    return f"{module}.{cls.__name__}"


def _wrap_forward(cls):
    forward = cls.forward

    @functools.wraps(forward)
    def counted(self, *args, **kwargs):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        if any(frame[0] is self for frame in stack):  # PEFT's path re-entering the same layer: one call
            return forward(self, *args, **kwargs)
        frame = [self, False]
        stack.append(frame)
        try:
            out = forward(self, *args, **kwargs)
        finally:
            stack.pop()
        name = _type_name(type(self))
        entry = _counts[name]
        entry["calls"] += 1
        if frame[1]:
            entry["fused"] += 1
        else:
            x = args[0] if args else None
            entry["unfused_why"][_why_unfused(self, x, args[1:], kwargs)] += 1
        return out

    cls.forward = counted


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _install_accelerated():
    import peft.tuners.lora  # noqa: F401  (imports the LoRA layer classes, bnb ones where available)
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    import fastadapters
    import fastadapters.peft_accel  # noqa: F401  (the accelerated classes, so their forward is counted too)
    from fastadapters.ops import _autograd

    for mod in ("bnb", "hqq", "eetq", "gptq", "awq", "aqlm", "torchao", "inc", "tp_layer"):
        try:
            __import__(f"peft.tuners.lora.{mod}")
        except Exception:
            pass
    # Every class, also those that inherit forward (PEFT's Conv2d from _ConvNd, the accelerated Conv2d from a
    # mixin): a call re-entering the same layer through super() is counted once, under the layer's own type.
    for cls in set(_all_subclasses(LoraLayer)):
        if isinstance(getattr(cls, "forward", None), type(_wrap_forward)):
            _wrap_forward(cls)

    call = _autograd.Op.__call__

    @functools.wraps(call)
    def op_call(self, *args):
        stack = getattr(_local, "stack", None)
        if stack:
            stack[-1][1] = True
        return call(self, *args)

    _autograd.Op.__call__ = op_call

    init = BaseTuner.__init__

    @functools.wraps(init)
    def accelerated_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        fastadapters.accelerate(self, verbose=False)

    BaseTuner.__init__ = accelerated_init


def pytest_configure(config):
    if MODE == "accelerated":
        _install_accelerated()


def pytest_collection_modifyitems(config, items):
    if EVERY <= 1:
        return
    keep = items[::EVERY]
    dropped = [item for i, item in enumerate(items) if i % EVERY]
    items[:] = keep
    config.hook.pytest_deselected(items=dropped)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid)
        if previous in (None, "passed"):  # a failed teardown after a passed call counts as failed
            _outcomes[report.nodeid] = "skipped" if report.skipped else report.outcome


def pytest_sessionfinish(session, exitstatus):
    os.makedirs(OUT, exist_ok=True)
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker is None:
        with open(os.path.join(OUT, "outcomes.json"), "w") as f:
            json.dump(_outcomes, f, indent=0, sort_keys=True)
    if MODE == "accelerated":
        counts = {k: {**v, "unfused_why": dict(v["unfused_why"])} for k, v in _counts.items()}
        with open(os.path.join(OUT, f"counts-{worker or 'main'}.json"), "w") as f:
            json.dump(counts, f, indent=1, sort_keys=True)


@pytest.hookimpl(tryfirst=True)
def pytest_report_header(config):
    return f"peft_suite_plugin: mode={MODE}, every={EVERY}"
