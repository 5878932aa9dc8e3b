"""User errors exit 2 with one line; bugs keep their traceback (``chatlora.cli.main``)."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.errors import ChatloraError


def test_every_user_error_type_is_a_chatlora_error_at_its_old_import_path():
    """Guards against a user-error type left outside the base class (it would surface as a traceback) or moved
    without its old import path (``from chatlora.data import DataError`` in users' code)."""
    from chatlora.cli import CliError
    from chatlora.config import ConfigError
    from chatlora.data import DataError
    from chatlora.files import FileError
    from chatlora.model import ModelError
    from chatlora.template import TemplateError
    from chatlora.training.train import TrainingDiverged

    for kind in (CliError, ConfigError, DataError, FileError, ModelError, TemplateError, TrainingDiverged):
        assert issubclass(kind, ChatloraError), kind
    # older callers catch these by their former bases
    assert issubclass(ConfigError, ValueError) and issubclass(FileError, ValueError)
    assert issubclass(TemplateError, ValueError) and issubclass(ModelError, RuntimeError)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["chat", "--prompt", "hi"], "chatlora: error: give --adapter DIR"),  # CliError
        (["data", "check", "DATA", "--no-tokenize", "--columns", "outptu=x"], "chatlora: error: unknown column"),
        (["merge", "--adapter", "EMPTY", "--output", "OUT"], "chatlora: error: EMPTY: no adapter_config.json"),
        (["chat", "--model", "embedded", "--device", "tpu9"], "chatlora: error: --device tpu9: expected auto"),
    ],
    ids=["cli", "config", "model", "device"],
)
def test_user_error_exits_2_with_one_line(argv, expected, tmp_path, capsys):
    """Guards against a user mistake ending in a traceback, a second line of noise, or an exit code other than 2."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "问", "output": "答"}])
    (tmp_path / "EMPTY").mkdir()
    names = {"DATA": str(data), "EMPTY": str(tmp_path / "EMPTY"), "OUT": str(tmp_path / "out")}
    argv = [names.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(expected.replace("EMPTY", names["EMPTY"])), err
    assert "Traceback" not in err


def test_data_error_prints_each_problem_on_its_own_line(tmp_path, capsys):
    """Guards against DataError's problems being squeezed into one ``chatlora: error:`` line or cut short."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "问"}, {"output": "答"}])
    assert main(["data", "check", str(data), "--no-tokenize"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{data}:") for line in lines), lines


@pytest.mark.parametrize("bug", [ValueError("internal"), KeyError("internal"), TypeError("internal")])
def test_a_bug_inside_a_command_keeps_its_traceback(bug, tmp_path, monkeypatch):
    """Guards against ``main`` passing an internal bug (a plain ValueError, KeyError, ...) off as a user mistake
    with exit 2 and one line, which hides where it happened."""

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr("chatlora.merge.merge", broken)
    with pytest.raises(type(bug)):
        main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "out")])


def test_a_new_user_error_type_needs_no_change_in_main(tmp_path, monkeypatch, capsys):
    """Guards against ``main`` listing error types one by one instead of catching the base class."""

    class NewKindOfMistake(ChatloraError):
        pass

    def refuse(*args, **kwargs):
        raise NewKindOfMistake("this adapter is not one you can merge")

    monkeypatch.setattr("chatlora.merge.merge", refuse)
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "chatlora: error: this adapter is not one you can merge\n"
