"""Layers: the package follows its design, stated in ``LAYERS``, and inference never imports the trainer.

Checks in the style of torchtune's ``test_import_recipes.py``: a parse of every ``import`` in the package (those
inside functions too), followed from module to module, finds none that goes up the layers or across the two sides,
no command importing a command and no circle; and each inference-side module imported alone in a fresh interpreter
leaves the trainer out of ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import chatlora

PACKAGE = Path(chatlora.__file__).parent

# The design, bottom to top: a module may import its own layer and the layers below, never one above. The train side
# and the inference side share a rank and never import each other. A command (the library of one CLI verb that the
# others do not build on) imports no other command; the CLI layer calls them. Checked on every import, those inside
# functions too, followed transitively: a module may not reach a higher layer through a lower one either.
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("base", frozenset({"chatlora", "errors", "files"})),
    # preference: pairs read and encoded; mixing: several SFT sources, weighted
    (
        "data and template",
        frozenset({"character", "config", "settings", "runcard", "data", "template", "preference", "mixing"}),
    ),
    ("model", frozenset({"model", "packing"})),  # packing: the one collator, of training and of eval's loss
    ("run", frozenset({"run"})),  # open a trained run: card, tokenizer, base + adapter, held-out split, checkpoints
    ("train side", frozenset({"training"})),  # train, plan, kernels, rundir, align (preference tuning on TRL)
    ("inference side", frozenset({"inference"})),  # engine, infer, chat
    ("commands", frozenset({"merge", "eval", "serve", "export", "show", "pairs"})),  # pairs: self-play pairs
    ("cli", frozenset({"cli", "quickstart", "studio", "__main__"})),  # quickstart: train, eval and chat in a row;
    # studio: every command behind a web page
]
SIDES = ("train side", "inference side")
LAYER = {name: layer for layer, names in LAYERS for name in names}
_ORDER = [layer for layer, _ in LAYERS]
RANK = {name: _ORDER.index(SIDES[0]) if layer in SIDES else _ORDER.index(layer) for name, layer in LAYER.items()}
COMMANDS = dict(LAYERS)["commands"]

# The trainer side, and the modules that must run without it (an inference server or an eval job).
TRAINER = dict(LAYERS)["train side"]
NO_TRAINER = sorted(dict(LAYERS)["inference side"] | COMMANDS | {"run", "runcard"})
TRAINER_LIBRARIES = ["transformers.trainer", "transformers.training_args", "liger_kernel", "trl"]


def _modules() -> list[str]:
    """The package's modules; a subpackage (``export/``) counts as one module, its files as its internals."""
    files = [p.stem if p.stem != "__init__" else "chatlora" for p in PACKAGE.glob("*.py")]
    return sorted(files + [p.parent.name for p in PACKAGE.glob("*/__init__.py")])


def _sources(module: str) -> list[tuple[Path, int]]:
    """``module``'s files, each with the relative-import level that reaches the chatlora package from it."""
    if module == "chatlora":
        return [(PACKAGE / "__init__.py", 1)]
    if (PACKAGE / module).is_dir():
        return [(p, 2) for p in sorted((PACKAGE / module).glob("*.py"))]
    return [(PACKAGE / f"{module}.py", 1)]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """The chatlora modules ``module`` imports anywhere in its code (typing-only imports excepted)."""
    found: set[str] = set()
    for path, top in _sources(module):
        found |= _file_imports(ast.parse(path.read_text(encoding="utf-8")), top)
    found.discard(module)
    return found


def _file_imports(tree: ast.Module, top: int) -> set[str]:
    """The chatlora modules one file imports; ``top`` is the relative level of the package (2 in a subpackage,
    whose own ``from .x`` imports stay inside it)."""
    skipped = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node) for n in node.body
    }
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if id(node) in skipped:
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == top or (node.level == 0 and (node.module or "").split(".")[0] == "chatlora"):
                base = (node.module or "").removeprefix("chatlora").lstrip(".") if node.level == 0 else node.module
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import x: a submodule, or a name of the package itself
                    found.update(a.name if a.name in RANK and a.name != "chatlora" else "chatlora" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "chatlora":
                    found.add(parts[1] if len(parts) > 1 else "chatlora")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _reach(module: str, graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every module ``module`` imports, directly or through others, each with the chain of imports that reaches it."""
    paths = {module: [module]}
    todo = [module]
    while todo:
        here = todo.pop()
        for there in sorted(graph.get(here, ())):
            if there not in paths:
                paths[there] = [*paths[here], there]
                todo.append(there)
    del paths[module]
    return paths


def violations() -> list[str]:
    """What breaks the design in the package at ``PACKAGE``: an unplaced module, an import up the layers or across
    the train/inference sides (direct or transitive), a command importing a command, an import circle."""
    modules = _modules()
    graph = {m: _imports(m) for m in modules}
    found = [
        f"chatlora.{m} has no layer: place it in LAYERS (tests/unit/test_layers.py)" for m in modules if m not in LAYER
    ]
    for module in modules:
        if module not in LAYER:
            continue
        for there in sorted(graph[module] & COMMANDS):
            if LAYER[module] != "cli":
                found.append(f"chatlora.{module} imports the command {there}: move what they share down a layer")
        for there, chain in sorted(_reach(module, graph).items()):
            how = " -> ".join(chain)
            if there not in LAYER:
                continue
            elif RANK[there] > RANK[module]:
                found.append(f"{how}: {LAYER[module]} reaches {LAYER[there]}, a higher layer")
            elif RANK[there] == RANK[module] and LAYER[there] != LAYER[module]:
                found.append(f"{how}: the {LAYER[module]} reaches the {LAYER[there]}")
            elif module in NO_TRAINER and there in TRAINER:
                found.append(f"{how}: {module} must run without the trainer")
        if _reach_circles(module, graph):
            found.append(f"chatlora.{module} is on an import circle")
    return found


def _reach_circles(module: str, graph: dict[str, set[str]]) -> bool:
    return any(module in graph.get(m, ()) for m in _reach(module, graph))


def test_the_package_follows_the_layers():
    """Guards against an upward import (data importing train, infer importing eval, ...), even one hidden inside a
    function or reached through another module, against the inference side importing the trainer side, and against
    a new module escaping the check because nobody placed it in the table."""
    assert violations() == []


def test_no_import_circles():
    """Guards against two modules importing each other (eval and report did: report needed EvalResult, eval
    write_report), through any number of modules in between."""
    graph = {m: _imports(m) for m in _modules()}
    circles = [m for m in graph if _reach_circles(m, graph)]
    assert not circles, f"modules on an import circle: {circles}"


def test_no_module_imports_a_command():
    """Guards against a command importing another (export used eval's held-out selection and merge's generation
    stops): what two commands share lives in a lower layer; only the CLI layer calls commands."""
    importers = {
        m: sorted(_imports(m) & COMMANDS) for m in _modules() if LAYER.get(m) != "cli" and _imports(m) & COMMANDS
    }
    assert not importers, f"modules importing a command: {importers}"


def test_errors_come_from_chatlora_errors():
    """Guards against error types imported from whichever module re-exports them (``from .model import
    ModelError``): the one user-error family is imported from chatlora.errors."""
    from chatlora import errors

    names = set(errors.__all__)
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").split(".")[-1] != "errors":
                wrong += [
                    f"{path.relative_to(PACKAGE)}: {a.name} from .{node.module}" for a in node.names if a.name in names
                ]
    assert not wrong, wrong


def test_layer_check_follows_a_lazy_import_into_a_command(tmp_path, monkeypatch):
    """Guards against the check missing the import that issue 24 names: a lazy ``from ..eval import ...`` inside a
    function of export (a command importing a command), and a circle made through a lower module."""
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("from .source import convs\n")
    (tmp_path / "export" / "source.py").write_text("def convs():\n    from ..eval import held_out_records\n")
    (tmp_path / "eval.py").write_text("from .inference.infer import ChatModel\n")
    for package in ("inference", "training"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "inference" / "infer.py").write_text("def load():\n    from ..run import open_run\n")
    (tmp_path / "run.py").write_text("def open_run():\n    from .training.train import x\n")
    (tmp_path / "training" / "train.py").write_text("")
    found = violations()
    assert "chatlora.export imports the command eval: move what they share down a layer" in found
    assert "inference -> run -> training: the inference side reaches the train side" in found
    assert "run -> training: run reaches train side, a higher layer" in found
    assert "eval -> inference -> run -> training: eval must run without the trainer" in found


def test_layer_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """Guards against the parse above missing lazy imports (the way infer used to reach chatlora.train)."""
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "infer.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .eval import EvalResult\n"
        "def load():\n    from .train import read_adapter\n    from . import __version__, data\n"
    )
    assert _imports("infer") == {"train", "chatlora", "data"}


def test_layer_check_sees_into_subpackages(tmp_path, monkeypatch):
    """Guards against a subpackage's files escaping the check: ``from ..cli`` in export/ is export importing cli,
    ``from .writer`` stays inside it."""
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("from .writer import write\n")
    (tmp_path / "export" / "writer.py").write_text(
        "def write():\n    from ..cli import main\n    from .. import data\n"
    )
    assert "export" in _modules()
    assert _imports("export") == {"cli", "data"}


@pytest.mark.parametrize("module", NO_TRAINER)
def test_inference_module_imports_without_the_trainer(module):
    """Guards against an inference-side module pulling in chatlora.train (and with it the trainer's dependencies)
    when imported alone, as a server or an eval job does."""
    names = [f"chatlora.{module}"]  # and, for a subpackage, each of its files
    if (PACKAGE / module).is_dir():
        names += [
            f"chatlora.{module}.{p.stem}" for p in sorted((PACKAGE / module).glob("*.py")) if p.stem != "__init__"
        ]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert set(names) <= loaded
    leaked = sorted(_trainer_modules() & loaded)
    assert not leaked, f"importing chatlora.{module} loads {leaked}"


def test_chat_and_merge_run_without_the_trainer(tiny_model_dir, tmp_path):
    """Guards against a lazy import of the trainer on the way to a reply or a merged model (the import check above
    only sees module-level imports): loading an adapter, generating and merging must not load it."""
    from chatlora.model import apply_lora, load_model, load_tokenizer

    adapter = tmp_path / "adapter"
    apply_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "v_proj"]).save_pretrained(adapter)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(adapter)
    code = (
        "import json, sys\n"
        "from chatlora.inference.infer import ChatModel, SamplingConfig\n"
        "from chatlora.merge import merge\n"
        f"chat = ChatModel.load({str(adapter)!r}, device='cpu')\n"
        "reply = chat.generate([{'role': 'user', 'content': 'hi'}], SamplingConfig(max_new_tokens=2, temperature=0))\n"
        f"merge({str(adapter)!r}, {str(tmp_path / 'merged')!r})\n"
        "print(json.dumps([reply.completion_tokens, sorted(sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens, loaded = json.loads(done.stdout.splitlines()[-1])
    assert tokens > 0 and "peft" in loaded and (tmp_path / "merged" / "config.json").is_file()
    leaked = sorted(_trainer_modules() & set(loaded))
    assert not leaked, f"chat + merge loaded {leaked}"


def _trainer_modules() -> set[str]:
    return {f"chatlora.{m}" for m in TRAINER} | set(TRAINER_LIBRARIES)
