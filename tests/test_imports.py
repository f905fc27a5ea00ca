"""The import graph of jaxtune/: no cycle anywhere (imports inside functions count), models know nothing
of training, and the package's face and config files load without JAX."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxtune"
# What models may not import: the training run, its data, storage, config and command-line modules.
TRAINING = (
    "jaxtune.train",
    "jaxtune.steps",
    "jaxtune.optim",
    "jaxtune.data",
    "jaxtune.checkpoint",
    "jaxtune.config",
    "jaxtune.sharding",
    "jaxtune.writers",
    "jaxtune.cli",
    "jaxtune.crossval",
    "jaxtune.predict",
    "jaxtune.evaluate",
    "jaxtune.export",
    "jaxtune.pretrained",
    "jaxtune.hf",
    "jaxtune.assets",
)


def modules() -> dict:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: pathlib.Path, known) -> set:
    """Every jaxtune module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif path.name == "__init__.py" and isinstance(node, ast.Constant) and node.value in known:
            found.add(node.value)  # the lazy package face names the modules it imports on first use
    return {m for m in found if m in known and m != name}


def graph() -> dict:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(g: dict) -> list | None:
    """One cycle of the directed graph ``g`` (node -> set of nodes) as a list of nodes, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for name in sorted(g):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_there_is_no_import_cycle():
    g = graph()
    assert len(g) > 30 and "jaxtune.train" in g
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # The import cycle this test was written against (config -> assets -> pretrained -> models -> ...):
    assert find_cycle({"config": {"assets"}, "assets": {"pretrained"}, "pretrained": {"config"}})


def test_models_import_nothing_of_training():
    g = graph()
    for name, targets in g.items():
        if name.startswith("jaxtune.models"):
            bad = {t for t in targets if t.startswith(TRAINING)}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_config_imports_only_modules_that_import_nothing_back():
    g = graph()
    for target in g["jaxtune.config"]:
        reach, todo = set(), [target]
        while todo:
            m = todo.pop()
            if m not in reach:
                reach.add(m)
                todo += g[m]
        assert "jaxtune.config" not in reach, target


def test_config_files_and_the_package_load_without_jax():
    code = (
        "import sys, jaxtune, jaxtune.config, jaxtune.errors\n"
        "jaxtune.config.defaults()\n"
        "print('jax' in sys.modules, 'flax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out


def test_the_package_functions_stay_functions_after_their_modules_load():
    code = (
        "import jaxtune\n"
        "from jaxtune.generate import generate_ids\n"  # loads the submodule jaxtune.generate first
        "import jaxtune.pretrained\n"
        "print(callable(jaxtune.generate), jaxtune.generate.__name__, jaxtune.load_pretrained.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "generate", "load_pretrained"], out
