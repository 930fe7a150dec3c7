"""The architecture as a test: every import inside onnxcomp (module level or inside a function) goes from a
higher layer to a lower one, so there are no cycles and, e.g., ir/rewrite/runtime never import passes."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "onnxcomp"

#: layer of each top-level module or package of onnxcomp; an import must not go to a higher layer, and within
#: one layer only inside the same unit
LAYERS = {
    "errors": 0,
    "storage": 1, "qmath": 1, "targets": 1, "testing": 1, "progress": 1,
    "ir": 2,
    "rewrite": 3, "runtime": 3, "data": 3,
    "calibration": 4,
    "validation": 5, "summary": 5, "context": 5,
    "algorithms": 6,
    "passes": 7,
    "recipe": 8, "pipeline": 8,
    "html_report": 8,
    "budget": 9, "report": 9, "layer_table": 9,
    "auto": 10,
    "api": 11,
    "__init__": 12,
    "cli": 13,
    "__main__": 14,
}


def _unit(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The onnxcomp units `path` imports (relative imports resolved; `from .. import ir` names the module)."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    mod = ".".join(rel.parts)
    pkg = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("onnxcomp"):
                continue
            if target == "onnxcomp":  # from onnxcomp import ir, storage
                out.update(a.name for a in node.names)
            else:
                out.add(_unit(target))
        elif isinstance(node, ast.Import):
            out.update(_unit(a.name) for a in node.names if a.name.startswith("onnxcomp."))
    return out


def test_every_unit_has_a_layer():
    units = {p.stem if p.parent == ROOT else p.relative_to(ROOT).parts[0] for p in ROOT.rglob("*.py")}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_go_down_the_layers():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = path.stem if path.parent == ROOT else path.relative_to(ROOT).parts[0]
        for other in _imports(path) - {me}:
            if other not in LAYERS:
                bad.append(f"{path.relative_to(ROOT)} imports unknown unit {other}")
            elif LAYERS[other] >= LAYERS[me]:
                bad.append(f"{path.relative_to(ROOT)} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})")
    assert not bad, "\n".join(bad)


def test_passes_package_holds_only_passes():
    from onnxcomp.passes import REGISTRY

    files = {p.stem for p in (ROOT / "passes").glob("*.py")} - {"__init__", "base"}
    packages = {p.parent.name for p in (ROOT / "passes").glob("*/__init__.py")}  # a pass split into modules
    assert files | packages == {cls.__module__.split(".")[2] for cls in REGISTRY.values()}
    assert not files & packages
