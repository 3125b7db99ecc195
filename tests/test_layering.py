"""Imports point down: kernels/ -> fastadapters/ops (and reference) -> layers -> patch -> bank, serving.

Read statically with `ast` (every import statement, those inside functions included, and literal
importlib.import_module calls), so an upward import fails here even on a path no test executes.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules above the op layer: nothing in fastadapters/ops or fastadapters/reference.py may import them.
ABOVE_OPS = (
    "layers",
    "patch",
    "bank",
    "io",
    "prefix",
    "families",
    "structure",
    "peft_accel",
    "serving",
    "train",
    "evaluate",
    "data",
    "cli",
    "demo",
)


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of module `module`."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from fastadapters import bank` imports the module fastadapters.bank.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def kernel_violation(name: str) -> bool:
    """Kernels import nothing from fastadapters except fastadapters.kernels itself."""
    return (name == "fastadapters" or name.startswith("fastadapters.")) and not (
        name == "fastadapters.kernels" or name.startswith("fastadapters.kernels.")
    )


def ops_violation(name: str) -> bool:
    """The op layer and the reference import nothing above the ops."""
    return any(name == f"fastadapters.{m}" or name.startswith(f"fastadapters.{m}.") for m in ABOVE_OPS)


def violations(files, module_of, is_violation) -> list[str]:
    out = []
    for path in files:
        for line, name in imported_modules(path.read_text(), module_of(path)):
            if is_violation(name):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return out


def test_kernels_import_nothing_above_them():
    files = sorted((ROOT / "kernels").rglob("*.py"))
    assert files, "no kernel sources found"
    found = violations(
        files,
        lambda p: (
            "fastadapters.kernels."
            + p.relative_to(ROOT / "kernels").with_suffix("").as_posix().replace("/", ".")
        ),
        kernel_violation,
    )
    assert not found, "upward imports from kernels/:\n" + "\n".join(found)


def test_ops_and_reference_import_nothing_above_ops():
    files = sorted((ROOT / "fastadapters" / "ops").rglob("*.py")) + [ROOT / "fastadapters" / "reference.py"]
    found = violations(
        files, lambda p: p.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."), ops_violation
    )
    assert not found, "upward imports from the op layer:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, module, bad",
    [
        ("def f():\n    from fastadapters.ops.multi_lora import host_meta\n", "fastadapters.kernels.x", True),
        ("import fastadapters.bank\n", "fastadapters.kernels.x", True),
        ("from fastadapters import _ext\n", "fastadapters.kernels.x", True),
        (
            "from fastadapters.kernels import ACTIVATIONS\nfrom . import lora\n",
            "fastadapters.kernels.x",
            False,
        ),
    ],
)
def test_kernel_rule_sees_imports_inside_functions(source, module, bad):
    assert any(kernel_violation(n) for _, n in imported_modules(source, module)) == bad


@pytest.mark.parametrize(
    "source, bad",
    [
        ("def f():\n    from fastadapters import layers\n", True),
        ("from ..serving import engine\n", True),
        ("import importlib\nimportlib.import_module('fastadapters.patch')\n", True),
        ("from fastadapters.ops import _checks\nfrom fastadapters import kernels\n", False),
        ("from . import _dispatch\n", False),
    ],
)
def test_ops_rule_sees_relative_and_dynamic_imports(source, bad):
    names = [n for _, n in imported_modules(source, "fastadapters.ops.lora")]
    assert any(ops_violation(n) for n in names) == bad, names
