"""Layers: lower modules never import higher ones, and inference never imports the trainer.

Two checks in the style of torchtune's ``test_import_recipes.py``: each inference-side module imported alone in a
fresh interpreter leaves the trainer out of ``sys.modules``, and a parse of every ``import`` in the package (those
inside functions too) finds none that goes up the table below.
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

# Bottom to top. A module may import modules of lower rows only (not its own row): workflows on one row do not
# import each other. A new module gets a row here before the test passes.
LAYERS: list[tuple[str, ...]] = [
    ("chatlora", "errors"),  # the package (its __version__) and the user-error types
    ("files",),  # safe reading and writing
    ("character",),  # character cards -> the system prompt (config compiles a card named in it)
    ("config", "runcard"),  # typed settings; what a run leaves on disk
    ("data",),
    ("template",),
    ("model", "packing", "kernels"),
    ("run",),  # open a trained run: card, tokenizer, base + adapter (every command that loads one)
    ("plan", "rundir"),  # the training plan; checkpoint folders
    ("persona",),  # the eval's persona section (eval passes in its loss and sampling; report renders it)
    ("train", "infer", "merge", "report", "show"),  # show: `data show`, records as training encodes them
    ("eval", "serve"),
    ("export", "quickstart"),
    ("cli",),
    ("__main__",),
]
RANK = {name: rank for rank, row in enumerate(LAYERS) for name in row}

# The trainer side, and the modules that must run without it (an inference server or an eval job).
TRAINER = {"train", "plan", "rundir", "kernels"}
NO_TRAINER = ["run", "infer", "merge", "serve", "eval", "report", "export", "runcard", "show"]
TRAINER_LIBRARIES = ["transformers.trainer", "transformers.training_args", "liger_kernel"]


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


def test_every_module_has_a_layer():
    """Guards against a new module escaping the layer check because nobody placed it in the table."""
    missing = [m for m in _modules() if m not in RANK]
    assert not missing, f"place {missing} in LAYERS (tests/unit/test_layers.py)"


@pytest.mark.parametrize("module", _modules())
def test_imports_go_down_the_layers(module):
    """Guards against an upward import (data importing train, infer importing eval, ...), even one hidden inside a
    function, and against inference-side code importing the trainer."""
    if module not in RANK:
        pytest.skip("not placed yet: see test_every_module_has_a_layer")
    upward = sorted(m for m in _imports(module) if RANK.get(m, len(LAYERS)) >= RANK[module])
    assert not upward, f"chatlora.{module} (row {RANK[module]}) imports {upward} from its own row or above"
    if module in NO_TRAINER:
        trainer = sorted(_imports(module) & TRAINER)
        assert not trainer, f"chatlora.{module} imports the trainer side: {trainer}"


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
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module('chatlora.{module}')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert f"chatlora.{module}" in loaded
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
        "from chatlora.infer import ChatModel, SamplingConfig\n"
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
