"""Export and merge on a full disk: refused before the work when the space is known to be short, and no partial
file left behind when a write fails anyway (issue 28 C)."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import gguf
import pytest
from safetensors import SafetensorError
from test_export import llama_run  # noqa: F401  (the module-scoped tiny run, reused)

from chatlora.cli import main

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).used, free))


def test_export_refuses_before_writing_when_space_is_short(llama_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Guards against starting a GGUF that cannot fit (an OSError half-way, minutes later)."""
    _free(monkeypatch, 10 << 20)
    out = tmp_path / "x"
    assert main(["export", "--adapter", str(llama_run), "--output", str(out), "--quant", "f16"]) == 2
    err = capsys.readouterr().err
    assert "writing the GGUF file needs about" in err and "free" in err and "Traceback" not in err
    assert not list(out.glob("*.gguf*"))


def test_export_write_failure_leaves_no_partial_file(llama_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Guards against a full disk mid-write leaving ``*.gguf.tmp`` behind (the disk stays full) or a traceback."""

    def full(self):
        self.fout[0].write(b"\0" * 4096)  # part of the file is on disk when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "x"
    assert main(["export", "--adapter", str(llama_run), "--output", str(out), "--quant", "f16"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "no partial file was left" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_merge_refuses_when_space_is_short(llama_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    _free(monkeypatch, 1 << 20)
    assert main(["merge", "--adapter", str(llama_run), "--output", str(tmp_path / "m")]) == 2
    assert "writing the merged model needs about" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("m.*.partial"))


def test_merge_write_failure_is_one_line_and_leaves_nothing(llama_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Guards against safetensors' own error type (not an OSError) escaping as a traceback on a full disk."""
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    assert main(["merge", "--adapter", str(llama_run), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the merged model" in err and "StorageFull" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("m.*.partial"))


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount")
def test_export_on_a_real_full_file_system(llama_run, tmp_path, capsys):  # noqa: F811
    """The same on a real 1 MiB tmpfs, where this machine allows mounting one (root in a container often does)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main(["export", "--adapter", str(llama_run), "--output", str(small / "x"), "--quant", "f32"]) == 2
        assert "free some space" in capsys.readouterr().err
        assert not list(small.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
