"""The core/Lightning boundary: the core never imports Lightning, no import circles, cheap import."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_bigmodel"
LIGHTNING_SIDE = "lightning_bigmodel.pl"  # may import Lightning


# The command (`lightning-bigmodel`, `python -m lightning_bigmodel`) is the Lightning side; it imports `pl.cli` only
# once a subcommand runs, so its `--help` stays light.
ENTRY_POINTS = ("lightning_bigmodel.__main__", "lightning_bigmodel._command")


def _on_lightning_side(module: str) -> bool:
    return module == LIGHTNING_SIDE or module.startswith(LIGHTNING_SIDE + ".") or module in ENTRY_POINTS
OPTIONAL = ("transformers", "torchao", "accelerate")  # never imported at module level anywhere


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules imported by ``path``; with ``top_level_only``, those run at import time (not in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    stack, nodes = list(tree.body), []
    while stack:  # TYPE_CHECKING blocks never run; function bodies run only when called
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _package_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_core_modules_never_import_lightning():
    offenders = {}
    for name, path in _package_modules().items():
        if _on_lightning_side(name):
            continue
        bad = sorted(i for i in _imports(path, top_level_only=False) if i.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"))
        bad += sorted(i for i in _imports(path, top_level_only=False) if _on_lightning_side(i))
        if bad:
            offenders[name] = bad
    assert offenders == {}, f"core modules import the Lightning side: {offenders}"


def test_optional_dependencies_are_imported_lazily():
    offenders = {}
    for name, path in _package_modules().items():
        bad = sorted(i for i in _imports(path, top_level_only=True) if i.split(".")[0] in OPTIONAL)
        if bad:
            offenders[name] = bad
    assert offenders == {}, f"optional dependencies imported at module level: {offenders}"


def test_no_import_circles():
    graph = _import_graph(top_level_only=True)
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], f"import circles: {cycles}"


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports (with ``top_level_only=False``, also inside functions: lazy imports)."""
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, top_level_only=top_level_only):
            while imported and imported not in modules:  # `from pkg.mod import name` -> pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)  # a package importing its own submodules is not a circle
        graph[name] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of two or more modules (each import circle once, as the set of its modules)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


PURE_PLANNING = "lightning_bigmodel.planning"
ABOVE_PLANNING = ("lightning_bigmodel.simulate", "lightning_bigmodel.offload", "lightning_bigmodel.fitting",
                  "lightning_bigmodel.dispatch", "lightning_bigmodel.checkpoint", "lightning_bigmodel.pipeline")  # fmt: skip


def test_planning_imports_nothing_above_it_not_even_inside_functions():
    offenders = {
        name: sorted(target for target in targets if target.startswith(ABOVE_PLANNING))
        for name, targets in _import_graph(top_level_only=False).items()
        if name == PURE_PLANNING or name.startswith(PURE_PLANNING + ".")
    }
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert offenders == {}, f"planning imports the layers above it: {offenders}"


def test_the_lazy_import_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checks above would pass on a tree whose planning imports simulate only inside a function: make one."""
    package = tmp_path / "lightning_bigmodel"
    for name, text in {
        "planning/lazy.py": "def plan():\n    from lightning_bigmodel.simulate.memory import simulate_memory\n",
        "simulate/memory.py": "from lightning_bigmodel.planning.lazy import plan\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setitem(globals(), "PACKAGE", package)
    with pytest.raises(AssertionError, match="planning imports the layers above it"):
        test_planning_imports_nothing_above_it_not_even_inside_functions()
    with pytest.raises(AssertionError, match="circles through lazy imports"):
        test_no_import_circles_even_through_lazy_imports()
    assert _circles(_import_graph(top_level_only=True)) == []  # the top-level-only check saw no circle there


def test_no_import_circles_even_through_lazy_imports():
    """No circle closed through an import inside a function either (one side importing the other when called): a
    shared name lives in a module both import, or the lower one is passed what it needs."""
    circles = _circles(_import_graph(top_level_only=False))
    assert not circles, f"import circles through lazy imports: {sorted(sorted(circle) for circle in circles)}"


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_core_api_end_to_end_never_imports_lightning(tmp_path):
    out = _run(
        f"""
        import sys
        import torch
        from torch import nn

        def anon():
            with open("/proc/self/status") as status:
                return next((int(l.split()[1]) * 1024 for l in status if l.startswith("RssAnon")), 0)

        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        before = anon()
        import lightning_bigmodel as lbm
        lbm.save_sharded_checkpoint(model, {str(tmp_path)!r}, max_shard_size=300)
        with lbm.init_empty_weights():
            empty = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        lbm.load_checkpoint_and_dispatch(empty, {str(tmp_path)!r}, device_map={{"0": "cpu", "2": "disk"}},
                                         offload_folder={str(tmp_path / "off")!r})
        x = torch.randn(3, 8)
        assert torch.equal(empty(x), model(x))
        grown = anon() - before
        assert grown <= 10 * 2**20, f"import + load grew anonymous memory by {{grown / 2**20:.1f}} MiB"
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")))
        """
    )
    assert out.strip() == "[]"


def test_import_loads_neither_torch_nor_lightning():
    out = _run("import sys, lightning_bigmodel; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "code",
    [
        "import lightning_bigmodel\nfrom lightning.pytorch import Trainer",  # plugin first
        "from lightning.pytorch import Trainer\nimport lightning_bigmodel",  # Lightning first
        "import lightning as L\nimport lightning_bigmodel\nTrainer = L.Trainer",  # the `lightning` umbrella
    ],
    ids=["plugin-first", "lightning-first", "umbrella"],
)
def test_strategy_name_is_registered_in_either_import_order(code):
    out = _run(
        code
        + textwrap.dedent(
            """
            from lightning_bigmodel import BigModelInferenceStrategy, ReplicatedBigModelStrategy
            trainer = Trainer(strategy="bigmodel", accelerator="cpu", devices=1, logger=False)
            print(type(trainer.strategy).__name__)
            from lightning.pytorch.strategies import StrategyRegistry
            print("bigmodel_replicas" in StrategyRegistry)
            """
        )
    )
    assert out.split() == ["BigModelInferenceStrategy", "True"]


def test_lazy_names_resolve_and_unknown_names_raise():
    import lightning_bigmodel

    for name in lightning_bigmodel.__all__:
        assert getattr(lightning_bigmodel, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_bigmodel.nope  # noqa: B018


def test_device_map_is_validated_once_along_load_checkpoint_and_dispatch(tmp_path, monkeypatch):
    import torch
    from torch import nn

    import lightning_bigmodel as lbm
    from lightning_bigmodel.planning import device_map as device_map_module

    calls = []
    real = device_map_module.check_device_map
    monkeypatch.setattr(device_map_module, "check_device_map", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lbm.save_sharded_checkpoint(plain, tmp_path / "ckpt", max_shard_size=300)
    with lbm.init_empty_weights():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lbm.load_checkpoint_and_dispatch(model, tmp_path / "ckpt", device_map={"0": "cpu", "2": "disk"})
    assert len(calls) == 1
    x = torch.randn(2, 8)
    assert torch.equal(model(x), plain(x))
    with pytest.raises(ValueError, match=r"leaves \['2.weight', '2.bias'\] unassigned"):
        with lbm.init_empty_weights():
            other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        lbm.load_checkpoint_and_dispatch(other, tmp_path / "ckpt", device_map={"0": "cpu"})


@pytest.mark.parametrize(
    "strategy_arg",
    ["--trainer.strategy=bigmodel", "--trainer.strategy.class_path=lightning_bigmodel.BigModelInferenceStrategy"],
    ids=["registered-name", "class-path"],
)
def test_plain_lightning_cli_takes_the_registered_name_or_the_class_path(strategy_arg):
    """A user's own LightningCLI script (not our command) that imports the plugin, then Lightning's CLI."""
    pytest.importorskip("jsonargparse")  # LightningCLI needs it
    out = _run(
        f"""
        import sys
        import lightning_bigmodel  # noqa: F401  (the plugin first; Lightning is imported after it)
        from lightning.pytorch.cli import LightningCLI
        from lightning.pytorch.demos.boring_classes import BoringModel
        sys.argv = ["predict.py", "{strategy_arg}", "--trainer.accelerator=cpu",
                    "--trainer.logger=false"]
        cli = LightningCLI(BoringModel, run=False)
        print(type(cli.trainer.strategy).__name__)
        """
    )
    assert out.split()[-1] == "BigModelInferenceStrategy"
