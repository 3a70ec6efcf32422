"""The package's folders are its layers: a module imports only from its own layer or below,
so a reader can tell from a path what a module may depend on."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vr"
# Lowest first. The lab harness drives a router from outside: no product module imports it.
LAYERS = ["foundation", "services", "transaction", "control", "patching", "lab", "cli"]
TOP_LEVEL = {"__init__": "foundation", "__main__": "cli", "cli": "cli", "client": "cli"}


def layer_of(module: str) -> str | None:
    """vr.services.dnsmasq -> services; vr.cli -> cli; vr -> foundation (its __version__)."""
    parts = module.split(".")
    if parts[0] != "vr":
        return None
    if len(parts) == 1:
        return "foundation"
    return parts[1] if parts[1] in LAYERS else TOP_LEVEL.get(parts[1])


def imports(path: Path) -> list[tuple[int, str]]:
    """Every vr module a file imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") if node.module == "vr" else (node.lineno, node.module)
                      for alias in node.names]  # fmt: skip
    return [(line, name) for line, name in found if name.split(".")[0] == "vr"]


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL]
    assert loose == [], f"modules outside a layer folder: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(set(LAYERS) - {"cli"})


def test_no_import_runs_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "vr." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = layer_of(module.removesuffix(".__init__"))
        for line, name in imports(path):
            target = layer_of(name)
            if target is not None and LAYERS.index(target) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {name} ({target})")
    assert upward == []
