"""The package's layering: each module imports only from its own pipeline stage or earlier ones.

The imports are read with `ast` from the source (imports inside functions and under
`TYPE_CHECKING` count too), so the test is fast and needs no import of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "onnx_spectral"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 450

# Stages in pipeline order. A folder entry ("graph/") covers every module under it.
STAGES: tuple[tuple[str, ...], ...] = (
    ("graph/", "errors.py"),
    ("ops/",),
    ("analysis.py", "cost.py", "reconstruction_layers.py", "streams.py"),
    ("calibration/",),
    ("selection/",),
    ("rewrite.py",),  # applies plans: compensation rewrites between its passes, refit after
    ("correction/",),
    ("quantize.py",),  # the model written, quantized after the corrections
    ("verify.py",),
    ("report.py", "plots.py"),
    ("options.py", "prepare.py", "api.py", "cli.py", "__init__.py"),
)


def _modules() -> list[Path]:
    """Every Python file of the package, as a path relative to the package root."""
    return sorted(path.relative_to(ROOT) for path in ROOT.rglob("*.py"))


def _stage(module: Path) -> int:
    """Index into STAGES of a module given relative to the package root."""
    text = module.as_posix()
    for index, entries in enumerate(STAGES):
        for entry in entries:
            if (entry.endswith("/") and text.startswith(entry)) or text == entry:
                return index
    raise AssertionError(f"{PACKAGE}/{text} belongs to no stage; add it to STAGES")


def _resolve(dotted: str) -> Path | None:
    """The module file of a dotted name under the package, or None when there is none."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(ROOT)
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(ROOT)
    return None


def _package_of(module: Path) -> list[str]:
    """Dotted package of a module, as a list of names, for resolving relative imports."""
    return [PACKAGE, *module.parent.parts]


def _imported(module: Path, source: str | None = None) -> set[Path]:
    """Package modules that `module` (or `source`, read as that module) imports anywhere."""
    if source is None:
        source = (ROOT / module).read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(module))
    targets: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(module)[: len(_package_of(module)) - node.level + 1]
                origin = ".".join([*package, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            # `from pkg import name` names a submodule when one exists, else an attribute.
            names = [f"{origin}.{alias.name}" if _resolve(f"{origin}.{alias.name}") else origin
                     for alias in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                targets.add(target)
    return targets


def _cases() -> list[object]:
    """One pytest case per module, named by its path."""
    return [pytest.param(module, id=module.as_posix()) for module in _modules()]


def _upward_imports(module: Path) -> list[str]:
    """Imports of `module` from a later stage, as 'imported (stage)'."""
    return [
        f"{target.as_posix()} (stage {_stage(target)})"
        for target in sorted(_imported(module))
        if _stage(target) > _stage(module)
    ]


def test_every_module_has_a_stage() -> None:
    for module in _modules():
        _stage(module)


@pytest.mark.parametrize("module", _cases())
def test_imports_follow_the_stage_order(module: Path) -> None:
    """`module` (stage n) imports only modules of stages 0..n."""
    assert _upward_imports(module) == [], f"{module.as_posix()} is in stage {_stage(module)}"


@pytest.mark.parametrize("module", _cases())
def test_no_module_is_too_long(module: Path) -> None:
    lines = len((ROOT / module).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module.as_posix()} has {lines} lines"


def test_the_import_parser_sees_function_level_and_relative_imports() -> None:
    source = (
        "from __future__ import annotations\n"
        "from onnx_spectral.ops import base, handler_for\n"
        "def f():\n"
        "    from onnx_spectral.api import compress\n"
        "    import onnx_spectral.report\n"
        "    from . import plan\n"
    )
    probe = Path("selection/probe.py")
    imported = {t.as_posix() for t in _imported(probe, source)}
    assert imported == {"ops/__init__.py", "ops/base.py", "api.py", "report.py",
                        "selection/plan.py"}
    later = {name for name in imported if _stage(Path(name)) > _stage(probe)}
    assert later == {"api.py", "report.py"}
