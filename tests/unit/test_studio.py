"""chatlora studio's API against a live server, each step a real ``chatlora`` subprocess on a tiny random model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from serving import BackgroundServer  # noqa: E402

from chatlora.config import load_config  # noqa: E402
from chatlora.errors import ConfigError  # noqa: E402
from chatlora.studio import RunsManager, create_app  # noqa: E402

WAIT_S = 300


def dialogues(n: int = 12) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": "Yes, my lord." if i % 2 else "As you wish."},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "Of course."},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


CARD = json.dumps({"spec": "chara_card_v2", "data": {"name": "Mira", "description": "A calm court scribe."}}).encode()


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def studio(runs, tiny_model_dir):
    manager = RunsManager(runs, model_roots=(tiny_model_dir,))
    with BackgroundServer(create_app(manager, max_upload_bytes=64 * 2**10)) as srv:
        srv.manager = manager
        yield srv
    manager.cancel_all()  # its steps would outlive it


def options(model_dir: Path, **extra) -> dict:
    return {"model": str(model_dir), "device": "cpu", "batch_size": 2, "max_steps": 2, "val_size": 2, **extra}


def post_run(url: str, opts: dict, data: bytes | None = None, card: bytes | None = None, **kw) -> httpx.Response:
    files = {"data": ("dialogues.jsonl", dialogues() if data is None else data, "application/json")}
    if card is not None:
        files["card"] = ("mira.json", card, "application/json")
    return httpx.post(url, files=files, data={"options": json.dumps(opts)}, timeout=120, **kw)


def wait_state(url: str, run_id: str, states: set[str], timeout: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/api/runs/{run_id}", timeout=30).json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"run {run_id} stayed {status['state']}: {status}"
        time.sleep(0.3)


def wait_step(url: str, run_id: str, step: str, timeout: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/api/runs/{run_id}/{step}", timeout=30).json()
        if status["state"] in ("done", "failed", "cancelled", "interrupted"):
            return status
        assert time.monotonic() < deadline, f"{step} of {run_id} did not end: {status}"
        time.sleep(0.5)


def run_folders(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) if runs.is_dir() else []


# ---------------------------------------------------------------- bad requests


def test_broken_json_line_is_named_by_line(studio, runs, tiny_model_dir):
    """Bug: a broken upload answered with a traceback or a 500, or named the studio's copy instead of the line."""
    lines = dialogues().decode().splitlines(keepends=True)
    lines[2] = '{"messages": [{"role": "user", "content": "oops"}\n'
    broken = "".join(lines).encode()
    for endpoint in ("/api/preview", "/api/runs"):
        r = post_run(studio.url + endpoint, options(tiny_model_dir), data=broken)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("dialogues.jsonl:3: "), message
        assert str(runs) not in message
    assert run_folders(runs) == []  # the refused run left nothing behind


def test_upload_over_the_limit_is_413(studio, runs, tiny_model_dir):
    """Bug: an upload of any size was read (and stored) before anything checked it."""
    r = post_run(studio.url + "/api/runs", options(tiny_model_dir), data=dialogues(400))
    assert len(dialogues(400)) > 64 * 2**10
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert run_folders(runs) == []


def test_cross_origin_post_does_not_start_a_run(studio, runs, tiny_model_dir):
    """Bug: a page on another site could post a form to the studio and start a run (or read the runs)."""
    r = post_run(studio.url + "/api/runs", options(tiny_model_dir), headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.post(studio.url + "/api/runs", headers={"Host": "evil.example"}, files={"data": ("a.jsonl", b"{}")})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert run_folders(runs) == [] and httpx.get(studio.url + "/api/runs").json() == {"runs": []}


def test_options_are_checked_like_the_cli(studio, runs, tiny_model_dir, tmp_path):
    """Bug: an option could name a file outside the runs folder (a model, the output folder), or a bad value
    started a run that failed later instead of being refused with the CLI's message."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cases = {
        "model": (options(tiny_model_dir, model=str(outside)), "names a path outside the studio's folders"),
        "relative model": (options(tiny_model_dir, model="../../etc"), "names a path outside"),
        "output_dir": (options(tiny_model_dir, output_dir=str(outside)), "`output_dir` is set by the studio"),
        "unknown": (options(tiny_model_dir, max_stepz=3), "unknown config key max_stepz"),
        "not an object": ([1, 2], "`options` must be a JSON object"),
    }
    for name, (opts, want) in cases.items():
        r = post_run(studio.url + "/api/runs", opts)
        assert r.status_code == 400 and want in r.json()["error"]["message"], (name, r.text)
    with pytest.raises(ConfigError) as cli_error:
        load_config(None, {"max_steps": 0})
    r = post_run(studio.url + "/api/runs", options(tiny_model_dir, max_steps=0))
    assert r.status_code == 400 and r.json()["error"]["message"] == str(cli_error.value)
    assert run_folders(runs) == [] and not any(outside.iterdir())


def test_preview_marks_control_tokens_and_plan_counts_steps(studio, tiny_model_dir):
    """Bug: the preview lost the control/trained marks of `data show`, or the plan disagreed with the options."""
    r = post_run(studio.url + "/api/preview", options(tiny_model_dir), card=CARD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stats"]["records"] == 12 and body["warnings"] == []
    first = body["records"][0]
    assert first["line"] == 1 and any(control for _, control, _ in first["runs"])
    trained = "".join(text for text, control, is_trained in first["runs"] if is_trained and not control)
    assert "As you wish." in trained and "question" not in trained
    assert "Mira" in "".join(text for text, _, _ in first["runs"])  # the card is the system prompt
    r = post_run(studio.url + "/api/plan", options(tiny_model_dir, max_steps=3))
    assert r.status_code == 200, r.text
    assert r.json()["steps"] == 3 and r.json()["held_out_records"] == 2
    assert any(line.startswith("plan: ") for line in r.json()["lines"])


# ---------------------------------------------------------------- runs


def test_two_runs_queue_on_one_device_then_eval_chat_export(studio, runs, tiny_model_dir):
    """Bug: two runs trained at once on one device, the events stream lost lines or never ended, or a finished
    run could not be judged, chatted with or exported from the API."""
    first = post_run(studio.url + "/api/runs", options(tiny_model_dir, save_steps=1), card=CARD)
    second = post_run(studio.url + "/api/runs", options(tiny_model_dir, max_steps=100000, save_steps=100000))
    assert first.status_code == 201 and second.status_code == 201, (first.text, second.text)
    a, b = first.json()["id"], second.json()["id"]
    assert first.headers["location"] == f"/api/runs/{a}"
    assert httpx.get(f"{studio.url}/api/runs/{a}").json()["state"] == "running"
    queued = httpx.get(f"{studio.url}/api/runs/{b}").json()
    assert queued["state"] == "queued" and queued["queue_position"] == 1
    assert {r["id"] for r in httpx.get(studio.url + "/api/runs").json()["runs"]} == {a, b}

    # the events of the first run: every metrics line, then the end
    with httpx.stream("GET", f"{studio.url}/api/runs/{a}/events", timeout=WAIT_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [dict(line.split(": ", 1) for line in block.splitlines()) for block in text.strip().split("\n\n")]
    data = [json.loads(e["data"]) for e in events if "event" not in e]  # the metrics lines, numbered by "id"
    assert [int(e["id"]) for e in events if "id" in e] == list(range(1, len(data) + 1))
    assert data[0]["event"] == "begin" and data[0]["max_steps"] == 2
    assert [d["step"] for d in data if "loss" in d] == [1, 2]
    states = {json.loads(e["data"])["state"] for e in events if e.get("event") == "state"}
    assert events[-1]["event"] == "end" and {"running", "done"} <= states
    done = httpx.get(f"{studio.url}/api/runs/{a}").json()
    assert done["state"] == "done" and done["step"] == 2 and done["max_steps"] == 2 and done["loss"] is not None
    assert done["tokens_per_s"] is not None and done["adapter"] is True
    # the live view's memory against the plan's estimate, and a sample reply at each save (the studio turns them on)
    assert done["peak_memory_gib"] > 0 and done["peak_reserved_gib"] is None and done["estimated_peak_gib"] > 0
    assert done["estimated_s_per_step"] > 0 and done["eta_from"] == "measured"
    assert [x["step"] for x in done["samples"]] == [1, 2]
    assert all(x["prompt"].startswith("question ") and isinstance(x["reply"], str) for x in done["samples"])
    assert sum(1 for e in events if e.get("event") == "state") >= 3  # running, each new sample, done

    # only now does the second run train; cancel it: its process group ends
    running = wait_state(studio.url, b, {"running"})
    assert running["started"] >= done["ended"]
    r = httpx.post(f"{studio.url}/api/runs/{b}/cancel", json={})
    assert r.status_code == 200
    assert wait_state(studio.url, b, {"cancelled", "failed", "done"})["state"] == "cancelled"
    pid = json.loads((runs / b / "studio.json").read_text())["jobs"]["train"]["pid"]
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert httpx.post(f"{studio.url}/api/runs/{b}/cancel", json={}).status_code == 409

    # chat: the tuned run and its base, through serve's OpenAI-compatible app
    models = httpx.get(f"{studio.url}/api/runs/{a}/v1/models", timeout=120).json()["data"]
    assert "tuned" in [m["id"] for m in models]
    body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    reply = httpx.post(f"{studio.url}/api/runs/{a}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
    assert httpx.get(f"{studio.url}/api/runs/{b}/v1/models").status_code == 409

    # eval and export of the finished run, and the downloads
    r = httpx.post(f"{studio.url}/api/runs/{a}/eval", json={"persona": False, "max_new_tokens": 4})
    assert r.status_code == 202, r.text
    assert httpx.post(f"{studio.url}/api/runs/{a}/eval", json={"max_new_tokens": 0}).status_code in (400, 409)
    report = wait_step(studio.url, a, "eval")
    assert report["state"] == "done", report
    assert "targets" in json.dumps(report["metrics"]) and httpx.get(studio.url + report["report"]).status_code == 200
    r = httpx.post(f"{studio.url}/api/runs/{a}/export", json={"quant": "q9"})
    assert r.status_code == 400 and "quant" in r.json()["error"]["message"]
    r = httpx.post(f"{studio.url}/api/runs/{a}/export", json={"quant": "f32", "samples": 1, "max_new_tokens": 4})
    assert r.status_code == 202, r.text
    exported = wait_step(studio.url, a, "export")
    # llama.cpp has no pre-tokenizer for the tiny model's byte tokenizer: export's own one-line error is shown (the
    # browser test exports the embedded model with its parity table)
    assert exported["state"] == "failed" and "pre-tokenizer" in exported["log_tail"], exported
    assert "no llama.cpp equivalent" in httpx.get(f"{studio.url}/api/runs/{a}/log", params={"step": "export"}).text
    z = httpx.get(f"{studio.url}/api/runs/{a}/adapter.zip", timeout=60)
    assert z.status_code == 200 and z.content[:2] == b"PK"
    assert httpx.get(f"{studio.url}/api/runs/{a}/files/../../{b}/studio.json").status_code == 404
    assert httpx.get(f"{studio.url}/api/runs/{a}/files/%2e%2e/{b}/studio.json").status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_restarted_studio_lists_interrupted_run_as_resumable(runs, tiny_model_dir):
    """Bug: a studio that stopped during a run forgot the run, listed it as running forever, or could not resume
    it from its checkpoint."""
    port = _free_port()
    cmd = [sys.executable, "-m", "chatlora", "studio", "--runs", str(runs), "--port", str(port)]
    studio = subprocess.Popen([*cmd, "--models", str(tiny_model_dir)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/api/runs")
                break
            except httpx.TransportError:
                assert studio.poll() is None and time.monotonic() < deadline, studio.stderr.read().decode()
                time.sleep(0.3)
        r = post_run(url + "/api/runs", options(tiny_model_dir, max_steps=16, save_steps=1))
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        adapter = runs / run_id / "adapter"
        deadline = time.monotonic() + WAIT_S
        while not any((p / "chatlora-complete.json").is_file() for p in adapter.glob("checkpoint-*")):
            assert time.monotonic() < deadline, (runs / run_id / "train.log").read_text()
            time.sleep(0.2)
    finally:
        studio.send_signal(signal.SIGKILL)  # the studio dies; its run goes on, in its own session
        studio.wait()
    pid = json.loads((runs / run_id / "studio.json").read_text())["jobs"]["train"]["pid"]

    adopting = RunsManager(runs)  # a studio started while the run still trains adopts it
    assert adopting.status(adopting.get(run_id))["state"] == "running"
    os.killpg(pid, signal.SIGKILL)  # the machine stops: the run dies without an exit code
    deadline = time.monotonic() + 30
    while adopting.get(run_id).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    manager = RunsManager(runs)
    status = manager.status(manager.get(run_id))
    assert status["state"] == "interrupted" and status["resumable"] is True and status["step"] >= 1
    manager.resume(manager.get(run_id))
    deadline = time.monotonic() + WAIT_S
    try:
        while manager.get(run_id).state in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        manager.cancel_all()
    status = manager.status(manager.get(run_id))
    assert status["state"] == "done", (runs / run_id / "train.log").read_text()[-3000:]
    assert status["step"] == 16
    begins = [r for r in map(json.loads, (adapter / "metrics.jsonl").read_text().splitlines()) if "event" in r]
    assert len(begins) == 2 and begins[1]["step"] >= 1  # went on from its checkpoint
