"""The package's shape: data flows one way (images → features → scores → maps → metrics → detector →
evaluation → front ends), so no module may import one from a later stage."""
from __future__ import annotations

import ast
from pathlib import Path

import anomalyvfm

ROOT = Path(anomalyvfm.__file__).parent
# Stage of each package or module (longest prefix wins); a module may import only from its stage or earlier.
STAGES = {
    "errors": 0, "checksums": 0, "declare": 0, "optional": 0, "prediction": 0, "version": 0, "demo": 0, "outputs": 0,
    "data": 1,
    "features": 2,
    "scoring": 3, "adaptation": 3,  # adaptation trains heads that score modes use: one stage
    "maps": 4, "metrics": 4,  # pure array code: maps and masks against the ground truth, below the detector
    "head": 5,  # everything after the backbone, torch-free: the detector and the exported runtime call it
    "detector": 6,
    "deploy": 7, "evaluation": 7, "distributed": 7, "store": 7,  # the inspection store: below the front ends
    "cli": 8, "service": 8, "": 8,  # "" is the package's __init__ (the public API)
}


def stage(module: str) -> int:
    name = module.removeprefix("anomalyvfm").removeprefix(".")
    parts = name.split(".") if name else []
    for cut in range(len(parts), -1, -1):
        key = ".".join(parts[:cut])
        if key in STAGES:
            return STAGES[key]
    raise AssertionError(f"module {module} has no stage in tests/test_layout.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imports(path: Path) -> list[str]:
    """Project modules imported by a file, at any depth of its code (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anomalyvfm"):
            found += [f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("anomalyvfm")]
    return found


def test_no_module_imports_a_later_stage():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        for target in imports(path):
            if stage(target) > stage(module):
                upward.append(f"{module} (stage {stage(module)}) imports {target} (stage {stage(target)})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import():
    """The rule must be able to fail: a scorer importing the detector would be caught."""
    assert stage("anomalyvfm.detector.detector") > stage("anomalyvfm.scoring.scorers")
    assert stage("anomalyvfm.metrics") < stage("anomalyvfm.detector.candidates") < stage("anomalyvfm.evaluation.evaluate")


def test_every_package_has_one_stage():
    """No exceptions: a stage belongs to a whole top-level package or module, never to a module inside one."""
    assert not [key for key in STAGES if "." in key]
