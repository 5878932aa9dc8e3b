"""Issue 11, files / data / CLI half: no command loses a user's file, freezes on an input or answers with a traceback.

Each test names the hostile-pass finding it guards against (issue 11, item N).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOL_TEMPLATE, make_tokenizer, write_jsonl

from chatlora.cli import main
from chatlora.template import IGNORE_INDEX, TemplateError, encode_conversation, encode_prompt, render_text

OK_ROW = {"instruction": "问", "input": "", "output": "答。"}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """An untrained LoRA adapter + tokenizer on the tiny model: all that generate and merge need, without training."""
    from chatlora.model import apply_lora, load_model, load_tokenizer

    out = tmp_path_factory.mktemp("adapter")
    apply_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "v_proj"]).save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def generate(adapter: Path | str, inp: Path | str, out: Path | str, *extra: str) -> int:
    args = ["--max-new-tokens", "2", "--temperature", "0", *extra]
    return main(["generate", "--adapter", str(adapter), "--input", str(inp), "--output", str(out), *args])


def run_cli(*args, timeout: float = 90, env: dict | None = None, limits: dict | None = None):
    """``python -m chatlora ARGS`` in a child process: a hang becomes TimeoutExpired, a runaway read hits a limit."""

    def preexec() -> None:
        for res, value in (limits or {}).items():
            resource.setrlimit(res, (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over RLIMIT_FSIZE a write fails with EFBIG instead

    return subprocess.run(
        [sys.executable, "-m", "chatlora", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
    )


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder this process cannot create files in (root ignores mode bits, so then a sysfs folder)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        yield folder
    elif Path("/sys/kernel").is_dir() and not _can_create_in(Path("/sys/kernel")):
        yield Path("/sys/kernel")
    else:
        pytest.skip("no folder here refuses writes")
    folder.chmod(0o755)


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / "chatlora-probe").touch()
    except OSError:
        return False
    (folder / "chatlora-probe").unlink()
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Item 1: generate never damages its input and never loses finished replies


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "hardlink"])
def test_generate_refuses_output_that_is_the_input(adapter_dir, tmp_path, capsys, spelling):
    """Guards against `generate --output` equal to `--input` (or a link to it) overwriting the prompts."""
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "一"}, {"prompt": "二"}])
    before = inp.read_bytes()
    out = {"same": inp, "dotdot": tmp_path / "sub" / ".." / "p.jsonl"}.get(spelling, tmp_path / "link.jsonl")
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        out.symlink_to(inp)
    elif spelling == "hardlink":
        os.link(inp, out)
    assert generate(adapter_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "--input" in err and "Traceback" not in err
    assert inp.read_bytes() == before


def test_generate_checks_the_output_before_loading_the_model(tmp_path, unwritable_dir, capsys):
    """Guards against a PermissionError traceback for --output in a read-only folder, found only after generating."""
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "一"}])
    missing_adapter = tmp_path / "no-such-adapter"
    assert generate(missing_adapter, inp, unwritable_dir / "r.jsonl") == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and str(unwritable_dir) in err and "Traceback" not in err
    assert "no-such-adapter" not in err


def test_generate_full_disk_keeps_the_existing_output_and_the_finished_rows(adapter_dir, tmp_path):
    """Guards against a full disk during `generate` truncating the existing output (it was opened with "w")."""
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"第{i}个问题", "id": i} for i in range(12)])
    out = tmp_path / "r.jsonl"
    out.write_text("previous results\n" * 400, encoding="utf-8")  # bigger than the file-size limit below
    before = out.read_bytes()
    limit = 800  # bytes per file: room for a few rows, not for all twelve
    proc = run_cli(
        "generate",
        *("--adapter", adapter_dir, "--input", inp, "--output", out),
        *("--max-new-tokens", "2", "--temperature", "0", "--batch-size", "2"),
        limits={resource.RLIMIT_FSIZE: limit},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stderr
    assert out.read_bytes() == before
    (partial,) = tmp_path.glob("r.jsonl.*.partial")
    rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert rows and all("reply" in r for r in rows)  # whole rows only: a cut last line is trimmed
    assert str(partial) in proc.stderr


def test_generate_crash_keeps_the_finished_replies(adapter_dir, tmp_path, monkeypatch):
    """Guards against a crash after hours of generation losing every finished reply (rows were written at the end)."""
    from chatlora.inference.infer import ReplyFile

    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"问{i}", "id": i} for i in range(6)])
    out = tmp_path / "r.jsonl"
    real = ReplyFile.add  # called as each reply finishes
    calls = []

    def crash_at_the_fifth_reply(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ReplyFile, "add", crash_at_the_fifth_reply)
    assert generate(adapter_dir, inp, out, "--batch-size", "2") == 130
    assert not out.exists()
    (partial,) = tmp_path.glob("r.jsonl.*.partial")
    rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) == 4  # in the order they finished


def test_generate_rows_keep_input_order_and_the_temp_files_go(adapter_dir, tmp_path):
    """Guards against the journal's batch order (grouped by system prompt) leaking into the output, or temp files left."""
    rows = [{"prompt": "一", "id": 0}, {"prompt": "二", "id": 1, "system": "别的"}, {"prompt": "三", "id": 2}]
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "r.jsonl"
    assert generate(adapter_dir, inp, out, "--batch-size", "2") == 0
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.jsonl"]


# ----------------------------------------------------------------------------------------------------------------------
# Item 2: merge never writes into a non-empty folder unless asked, and never leaves half a model


def test_merge_refuses_a_non_empty_output(adapter_dir, tmp_path, capsys):
    """Guards against `merge --output` silently replacing another run's card, config and tokenizer."""
    out = tmp_path / "other-run"
    out.mkdir()
    (out / "chatlora.json").write_text('{"mine": true}', encoding="utf-8")
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["chatlora.json"]
    assert (out / "chatlora.json").read_text(encoding="utf-8") == '{"mine": true}'


def test_merge_overwrite_replaces_its_files_and_keeps_the_rest(adapter_dir, tmp_path):
    """Guards against --overwrite being ignored, or deleting files in the folder that merge does not write."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}", encoding="utf-8")
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left behind


def test_merge_that_fails_midway_leaves_no_half_written_output(adapter_dir, tmp_path, monkeypatch, capsys):
    """Guards against a failed save (full disk) leaving a truncated model.safetensors that loads as garbage."""
    from transformers import PreTrainedModel

    def save_then_fail(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(out) in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_merge_output_that_is_a_file(adapter_dir, tmp_path, capsys):
    """Guards against a traceback (NotADirectoryError) when --output names an existing file."""
    out = tmp_path / "model.bin"
    out.write_bytes(b"x")
    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err and out.read_bytes() == b"x"


# ----------------------------------------------------------------------------------------------------------------------
# Item 5: rendering is linear in the number of messages and token-exact


def _conversation(turns: int, system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": "你是甄嬛"}] if system else []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"问题 {i} "}, {"role": "assistant", "content": f"回答 {i}。"}]
    return msgs


def _prefix_pieces(messages, tokenizer, add_generation_prompt):
    """The pre-issue-11 algorithm, kept as the reference: render every prefix and cut the full text at its length."""
    from chatlora.template import end_of_turn

    full = render_text(messages, tokenizer, add_generation_prompt=add_generation_prompt)
    eot, _ = end_of_turn(tokenizer)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_text(messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_text(messages[: i + 1], tokenizer)
        if not (full.startswith(before) and full.startswith(upto)):
            raise TemplateError("history rewritten")
        start, end = len(before), len(upto)
        cut = full[start:end].rfind(eot)
        stop = start + cut + len(eot) if cut >= 0 else end
        pieces += [(full[pos:start], False), (full[start:stop], True)]
        pos = stop
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [(text, trained) for text, trained in pieces if text]


def _reference_encoding(messages, tokenizer):
    input_ids, labels = [], []
    for text, trained in _prefix_pieces(messages, tokenizer, False):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


ROUND_TEMPLATE = (  # numbers the rounds: a window of late turns renders differently from the whole conversation
    "{% for m in messages %}{% if m['role'] == 'user' %}[Round {{ loop.index // 2 }}]{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (  # BOS before the first message only, contents trimmed
    "{% for m in messages %}{% set c = '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim + '<|im_end|>' %}"
    "{% if loop.index0 == 0 %}{% set c = '<|pad|>' + c %}{% endif %}{{ c }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)
LATE_REWRITE = (  # rewrites history only once a conversation passes 20 messages
    "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
    "{% if messages | length > 20 and loop.last %}|{% else %};{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize(
    "template", [None, SMOL_TEMPLATE, ROUND_TEMPLATE, LLAMA3_LIKE], ids=["chatml", "smol", "rounds", "llama3"]
)
@pytest.mark.parametrize("system", [True, False])
def test_encoding_matches_the_prefix_algorithm_on_long_conversations(template, system):
    """Guards against the linear renderer cutting replies differently from the exact prefix renderer it replaces."""
    from chatlora.template import ensure_chat_template

    tok = make_tokenizer(template)
    ensure_chat_template(tok)
    conv = _conversation(30, system=system)
    assert tuple(encode_conversation(conv, tok))[:2] == _reference_encoding(conv, tok)
    history = conv[:-1]
    expected = [
        i for text, _ in _prefix_pieces(history, tok, True) for i in tok(text, add_special_tokens=False)["input_ids"]
    ]
    assert encode_prompt(history, tok) == expected


def test_template_that_rewrites_late_history_is_still_refused():
    """Guards against the windowed renderer missing a history rewrite that the prefix renderer refused."""
    tok = make_tokenizer(LATE_REWRITE)
    with pytest.raises(TemplateError):
        encode_conversation(_conversation(15), tok)


def test_a_2000_turn_conversation_encodes_token_exact(tokenizer):
    """Guards against drift over a long conversation: ids and labels equal the ChatML text's, replies + <|im_end|>."""
    conv = _conversation(2000)
    enc = encode_conversation(conv, tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    want_ids, want_labels = [], []
    for m in conv:
        head, reply, tail = ids(f"<|im_start|>{m['role']}\n"), ids(m["content"] + "<|im_end|>"), ids("\n")
        want_ids += head + reply + tail
        trained = m["role"] == "assistant"
        want_labels += [IGNORE_INDEX] * len(head) + (reply if trained else [IGNORE_INDEX] * len(reply)) + [-100]
    assert enc.input_ids == want_ids and enc.labels == want_labels and not enc.truncated


def test_rendering_work_grows_linearly_with_the_conversation(tokenizer, monkeypatch):
    """Guards against re-rendering every prefix (quadratic: `data check` on 4,000 turns took 404 s)."""
    rendered = []
    real = type(tokenizer).apply_chat_template

    def counting(self, conversation, *args, **kwargs):
        rendered.append(len(conversation))
        return real(self, conversation, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counting)
    work = {}
    for turns in (100, 400):
        rendered.clear()
        encode_conversation(_conversation(turns), tokenizer)
        encode_prompt(_conversation(turns)[:-1], tokenizer)
        work[turns] = sum(rendered)
    assert work[400] <= 4.5 * work[100]  # the prefix algorithm does ~16x the work for 4x the turns
    assert work[400] <= 20 * 2 * (2 * 400 + 1)  # a bounded number of messages rendered per message


# ----------------------------------------------------------------------------------------------------------------------
# Item 8: regular files only, and a size limit


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


def test_data_check_on_a_fifo_fails_fast(fifo):
    """Guards against `data check` on a named pipe waiting forever for a writer."""
    proc = run_cli("data", "check", fifo, "--no-tokenize", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{fifo}: ") and "regular file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--data", "--config"])
def test_train_on_a_fifo_fails_fast(fifo, tiny_model_dir, tmp_path, flag):
    """Guards against `train --data PIPE` / `--config PIPE` hanging forever."""
    proc = run_cli("train", flag, fifo, "--model", tiny_model_dir, "--output-dir", tmp_path / "o", timeout=60)
    assert proc.returncode == 2 and str(fifo) in proc.stderr and "regular file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_generate_on_a_fifo_fails_fast(fifo, tmp_path):
    """Guards against `generate --input PIPE` hanging forever."""
    proc = run_cli("generate", "--adapter", tmp_path, "--input", fifo, "--output", tmp_path / "r.jsonl", timeout=60)
    assert proc.returncode == 2 and str(fifo) in proc.stderr and "regular file" in proc.stderr


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("command", ["data", "generate"])
def test_dev_zero_is_refused_without_reading_it(command, tmp_path):
    """Guards against reading /dev/zero until the kernel kills the process (24 GB)."""
    if command == "data":
        args = ("data", "check", "/dev/zero", "--no-tokenize")
    else:
        args = ("generate", "--adapter", tmp_path, "--input", "/dev/zero", "--output", tmp_path / "r.jsonl")
    proc = run_cli(*args, timeout=60, limits={resource.RLIMIT_AS: 6 << 30})
    assert proc.returncode == 2 and "/dev/zero: " in proc.stderr and "regular file" in proc.stderr


def test_inputs_over_the_size_limit_are_refused_with_the_way_to_raise_it(tmp_path, capsys, monkeypatch):
    """Guards against reading any file however large (memory exhaustion) or a limit the user cannot lift."""
    data = write_jsonl(tmp_path / "d.jsonl", [OK_ROW] * 100)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "问" * 100}] * 20)
    monkeypatch.setenv("CHATLORA_MAX_INPUT_SIZE", "1K")
    assert main(["data", "check", str(data), "--no-tokenize"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{data}: ") and "1 KiB" in err and "CHATLORA_MAX_INPUT_SIZE" in err
    assert generate(tmp_path, prompts, tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prompts}: ") and "CHATLORA_MAX_INPUT_SIZE" in err
    monkeypatch.setenv("CHATLORA_MAX_INPUT_SIZE", "1M")
    assert main(["data", "check", str(data), "--no-tokenize"]) == 0
    monkeypatch.setenv("CHATLORA_MAX_INPUT_SIZE", "lots")
    assert main(["data", "check", str(data), "--no-tokenize"]) == 2
    assert "CHATLORA_MAX_INPUT_SIZE" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Items 10, 11, 16: hostile JSON values get PATH:LINE, exit 2


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000


def _hostile_files(tmp_path: Path, value: str) -> dict[str, Path]:
    """The value on line 2 of a JSONL data file, of a JSON-array data file and of a prompts file."""
    good = json.dumps(OK_ROW, ensure_ascii=False)
    return {
        "jsonl": write(tmp_path / "d.jsonl", f'{good}\n{{"instruction": "a", "output": "b", "x": {value}}}\n'),
        "array": write(tmp_path / "d.json", f'[{good},\n{{"instruction": "a", "output": "b", "x": {value}}}]\n'),
        "prompts": write(tmp_path / "p.jsonl", f'{{"prompt": "a"}}\n{{"prompt": "a", "x": {value}}}\n'),
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("value", "words"),
    [(DEEP, "nested"), (HUGE_INT, "digits"), ('"\\ud800"', "invalid Unicode"), ('{"k\\udfff": 1}', "invalid Unicode")],
    ids=["deep", "huge-int", "lone-surrogate", "surrogate-in-key"],
)
def test_hostile_json_values_are_reported_with_their_line(value, words, tmp_path, capsys):
    """Guards against RecursionError / 'Exceeds the limit (4300 digits)' tracebacks and lone surrogates passing."""
    files = _hostile_files(tmp_path, value)
    for kind in ("jsonl", "array"):
        assert main(["data", "check", str(files[kind]), "--no-tokenize"]) == 2, kind
        err = capsys.readouterr().err
        assert err.startswith(f"{files[kind]}:2: ") and words in err and "Traceback" not in err, err[:300]
    assert generate(tmp_path / "no-adapter", files["prompts"], tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{files['prompts']}:2: ") and words in err, err[:300]


def test_lone_surrogate_stops_tokenizing_commands_with_its_line(tmp_path, tiny_model_dir, capsys):
    """Guards against `data check` (tokenizing) and `train` crashing with TypeError on a lone surrogate."""
    path = write(tmp_path / "d.jsonl", json.dumps(OK_ROW) + '\n{"instruction": "\\ud83d", "output": "b"}\n')
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:2: invalid Unicode")
    assert (
        main(["train", "--data", str(path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]) == 2
    )
    assert capsys.readouterr().err.startswith(f"{path}:2: invalid Unicode")


def test_surrogate_pairs_are_fine(tmp_path, capsys):
    """Guards against rejecting an escaped emoji (a valid surrogate pair) along with lone surrogates."""
    path = write(tmp_path / "d.jsonl", '{"instruction": "\\ud83d\\ude00", "output": "\\\\ud800 is text"}\n')
    assert main(["data", "check", str(path), "--no-tokenize"]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Item 13: generate on a directory or into an unwritable place


def test_generate_input_that_is_a_directory(tmp_path, capsys):
    """Guards against an IsADirectoryError traceback for `generate --input DIR`."""
    assert generate(tmp_path, tmp_path, tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path}: is a directory") and "Traceback" not in err


def test_generate_output_that_is_a_directory(tmp_path, capsys):
    """Guards against an IsADirectoryError traceback (after generating everything) for `--output DIR`."""
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    (tmp_path / "out").mkdir()
    assert generate(tmp_path / "no-adapter", inp, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: is a directory" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# Item 15: generate reads prompts with the data reader


def test_generate_accepts_json_holding_u2028(adapter_dir, tmp_path):
    """Guards against str.splitlines() cutting a valid JSONL line at U+2028 / U+2029 (an 'invalid JSON' error)."""
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "第一行\u2028第二行\u2029", "id": 7}, ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "r.jsonl"
    assert generate(adapter_dir, inp, out) == 0
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert row["id"] == 7 and row["prompt"] == "第一行\u2028第二行\u2029"


def test_generate_reports_every_bad_prompt_line(tmp_path, capsys):
    """Guards against fixing a prompts file one error per run (only the first bad line was reported)."""
    inp = write(
        tmp_path / "p.jsonl",
        '{"prompt": "ok"}\nnot json\n{"prompt": 3}\n[1]\n{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}\n{"messages": [{"role": "bot", "content": "x"}]}\n',
    )
    assert generate(tmp_path / "no-adapter", inp, tmp_path / "r.jsonl") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{inp}:{n}" for n in (2, 3, 4, 5, 6)]


# ----------------------------------------------------------------------------------------------------------------------
# Item 18: broken adapter files and UTF-16 without a BOM are named


def _broken_adapter(adapter_dir: Path, tmp_path: Path, name: str, content: str | None) -> Path:
    broken = tmp_path / "adapter"
    shutil.copytree(adapter_dir, broken)
    if content is None:
        (broken / name).unlink()
    else:
        (broken / name).write_text(content, encoding="utf-8")
    return broken


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("adapter_config.json", "{not json", "invalid JSON"),
        ("adapter_config.json", "[1, 2]", "expected a JSON object"),
        ("adapter_config.json", '{"r": 4}', "base_model_name_or_path"),
        ("chatlora.json", '{"base_model": ', "invalid JSON"),
        ("chatlora.json", '"a run card"', "expected a JSON object"),
        ("chatlora.json", '{"base_model": "embedded"}', '"base_model"'),
        ("chatlora.json", '{"template": ["S"]}', '"template"'),
        ("adapter_model.safetensors", None, "no adapter weights"),
    ],
    ids=lambda v: str(v)[:12],
)
def test_broken_adapter_files_are_named(adapter_dir, tmp_path, capsys, name, content, words):
    """Guards against JSONDecodeError / AttributeError tracebacks that do not say which adapter file is broken."""
    broken = _broken_adapter(adapter_dir, tmp_path, name, content)
    assert main(["chat", "--adapter", str(broken), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert str(broken / name) in err and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_named_once(tmp_path, capsys, encoding):
    """Guards against a BOM-less UTF-16 file producing 'invalid JSON' on every line."""
    text = "".join(json.dumps(OK_ROW, ensure_ascii=False) + "\n" for _ in range(5))
    data = tmp_path / "d.jsonl"
    data.write_bytes(text.encode(encoding))
    assert main(["data", "check", str(data), "--no-tokenize"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{data}:1: ") and "UTF-16 is not supported, save it as UTF-8" in line
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes('{"prompt": "问"}\n{"prompt": "答"}\n'.encode(encoding))
    assert generate(tmp_path / "no-adapter", prompts, tmp_path / "r.jsonl") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{prompts}:1: ") and "UTF-16" in line
