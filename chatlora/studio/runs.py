"""The studio's runs: one folder each under the runs folder, each step (train, eval, export) a ``chatlora``
subprocess in its own process group, one at a time per device.

A run folder holds ``studio.json`` (the options and every step's state, rewritten by rename on each change), the
uploads, ``train.yaml`` (the run's config, what ``chatlora train --config`` reads), ``adapter/`` (train's output
folder: metrics, checkpoints, adapter, eval report) and a log per step. A step runs as ``sh -c 'CMD; echo $? > RC'``
in a new session: the studio survives the step's crash, a cancel terminates the whole process group, and a step
outlives a studio that stops. A studio started on the same folder finds every run: a step still running is adopted
(watched by its process id and start time), one that ended meanwhile gets its state from its exit code file, and one
that died with no exit code (the machine restarted) is ``interrupted``; a train step with a complete checkpoint can
be resumed with ``chatlora train --resume``.

One idea over 600 lines: the life of a studio run (its folder, its steps as processes, their queue and states).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from ..config import TrainConfig, load_config
from ..errors import ChatloraError, ConfigError, DataError
from ..export import QUANTS
from ..run import complete_checkpoints
from ..runcard import SAMPLES
from ..settings import EvalConfig

__all__ = ["FINAL", "STATES", "Job", "Run", "RunStateError", "RunsManager", "Upload", "device_key"]

log = logging.getLogger(__name__)

RUN_FILE = "studio.json"
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
KINDS = ("train", "eval", "export")
STAGING = ".staging"
_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")
DATA_SUFFIXES = (".json", ".jsonl")
CARD_SUFFIXES = (".json", ".png")
# train options the studio sets itself: a request that names them is refused with the reason
MANAGED = {
    "data": "upload the dataset as the `data` file",
    "character": "upload the character card as the `card` file",
    "output_dir": "the studio writes each run into its own folder under --runs",
    "resume": "resume a stopped run with POST /api/runs/{id}/resume",
    "overwrite": "each run has a new folder: there is nothing to overwrite",
}
PATH_OPTIONS = ("model", "deepspeed")  # options that may name a file or folder: only under the studio's folders
# what the studio changes from train's defaults when the request leaves them out: a point on the live loss chart
# per step (train's default, 10, leaves a 4-step run one point, at its end), and a sample reply at each checkpoint
STUDIO_DEFAULTS: dict[str, Any] = {"logging_steps": 1, "samples": True}
# eval options a request may set (the others name paths, or the device, which is the run's)
EVAL_OPTIONS = ("max_samples", "max_new_tokens", "batch_size", "repetition_penalty", "examples", "persona")
EXPORT_OPTIONS = {"quant": str, "samples": int, "max_new_tokens": int}
TERMINATE_GRACE_S = 10.0


class RunStateError(ChatloraError):
    """The run is not in a state that allows what was asked (cancel a finished run, eval one still training)."""


@dataclass
class Upload:
    """A file from a request: the name its sender gave, and its bytes."""

    name: str
    file: BinaryIO


def device_key(device: str) -> str:
    """The device a run trains on, as the queue counts it: ``cpu`` or ``cuda:N`` (``auto`` resolved here)."""
    from ..model import pick_device

    dev = pick_device(device)
    return "cuda:0" if dev.type == "cuda" and dev.index is None else str(dev)


# ---------------------------------------------------------------- runs and their steps


@dataclass
class Job:
    """One step of a run, a ``chatlora`` subprocess: ``train``, ``eval`` or ``export``."""

    kind: str
    argv: list[str]
    device: str
    state: str = "queued"
    queued: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    pid_start: str | None = None  # the process's start time (/proc), so a reused pid is not taken for it
    returncode: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Run:
    """A run folder and what ``studio.json`` says of it."""

    id: str
    folder: Path
    created: float
    data_name: str
    card_name: str | None
    options: dict[str, Any]
    device: str
    jobs: dict[str, Job] = field(default_factory=dict)

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    @property
    def metrics(self) -> Path:
        return self.adapter / "metrics.jsonl"

    @property
    def state(self) -> str:
        return self.jobs["train"].state

    def log_path(self, kind: str) -> Path:
        return self.folder / f"{kind}.log"

    def rc_path(self, kind: str) -> Path:
        return self.folder / f".{kind}.rc"

    def export_dir(self, quant: str) -> Path:
        return self.folder / f"export-{quant}"

    @property
    def resumable(self) -> bool:
        """Stopped before its end with a complete checkpoint to go on from."""
        return self.state in ("interrupted", "failed", "cancelled") and bool(complete_checkpoints(self.adapter))

    def save(self) -> None:
        data = {
            "id": self.id,
            "created": self.created,
            "data_name": self.data_name,
            "card_name": self.card_name,
            "options": self.options,
            "device": self.device,
            "jobs": {k: j.to_dict() for k, j in self.jobs.items()},
        }
        tmp = self.folder / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / RUN_FILE)

    @classmethod
    def load(cls, folder: Path) -> Run:
        d = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
        jobs = {k: Job.from_dict(j) for k, j in d.get("jobs", {}).items()}
        return cls(d["id"], folder, d["created"], d["data_name"], d.get("card_name"), d["options"], d["device"], jobs)

    def progress(self) -> dict[str, Any]:
        """Step, steps, losses, tokens/s, peak memory and ETA from ``metrics.jsonl`` (what train wrote so far),
        against the plan's estimates; the checkpoint samples from ``samples.jsonl``.

        The ETA comes from the measured steps once a loss line is in (``eta_from``: ``measured``), from the plan's
        estimated seconds per step before (``plan``)."""
        out: dict[str, Any] = {
            "step": 0,
            "max_steps": None,
            "loss": None,
            "eval_loss": None,
            "tokens_per_s": None,
            "eta_s": None,
            "eta_from": None,
            "peak_memory_gib": None,
            "peak_reserved_gib": None,
            "estimated_peak_gib": None,
            "estimated_s_per_step": None,
        }
        begin = None
        for row in read_metrics(self.metrics):
            if row.get("event") == "begin":
                begin = row
                out["max_steps"] = row.get("max_steps", out["max_steps"])
                for key in ("estimated_peak_gib", "estimated_s_per_step"):
                    out[key] = row.get(key)
                if out["estimated_s_per_step"] and out["max_steps"]:
                    left = max(out["max_steps"] - row.get("step", 0), 0)
                    out["eta_s"], out["eta_from"] = round(out["estimated_s_per_step"] * left, 1), "plan"
                continue
            out["step"] = max(out["step"], row.get("step", 0))
            if "loss" in row:
                out["loss"] = row["loss"]
                out["tokens_per_s"] = row.get("tokens_per_second_recent")
                for key in ("peak_memory_gib", "peak_reserved_gib"):
                    out[key] = row.get(key, out[key])
                if begin is not None and row["step"] > begin["step"] and out["max_steps"]:
                    per_step = (row["time"] - begin["time"]) / (row["step"] - begin["step"])
                    out["eta_s"] = round(per_step * max(out["max_steps"] - row["step"], 0), 1)
                    out["eta_from"] = "measured"
            if "eval_loss" in row:
                out["eval_loss"] = row["eval_loss"]
        if out["max_steps"] is None and self.options.get("max_steps", -1) > 0:
            out["max_steps"] = self.options["max_steps"]
        out["samples"] = read_metrics(self.adapter / SAMPLES)
        return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metrics (or samples) file being written (a half-written last line is left
    out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---------------------------------------------------------------- processes


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(job: Job) -> bool:
    return job.pid is not None and job.pid_start is not None and _proc_start(job.pid) == job.pid_start


def _wait_group(pid: int) -> None:
    """Until no process of the group ``pid`` is left (SIGKILL after the grace time): the device is free then."""
    deadline = time.monotonic() + TERMINATE_GRACE_S
    while True:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            _signal_group(pid, signal.SIGKILL)
        time.sleep(0.05)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the step's shell leads its own session: its group is its pid
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the manager


class RunsManager:
    """Every run under ``root``: creates them from uploads, queues their steps per device, starts, watches and
    cancels the subprocesses, and finds the runs again after a restart.

    Args:
        root: the runs folder (created if missing). Every file the studio writes or serves is inside it.
        model_roots: folders besides ``root`` whose models a request may name (``--models``).
        python: the interpreter that runs ``-m chatlora``.
        poll_s: how often an adopted step (started by an earlier studio) is checked.
    """

    def __init__(
        self, root: str | Path, model_roots: tuple[str | Path, ...] = (), python: str = sys.executable, poll_s=1.0
    ) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--runs {root}: cannot be created ({e.strerror or e})") from None
        self.roots = [self.root, *(Path(r).resolve() for r in model_roots)]
        self.python, self.poll_s = python, poll_s
        self.runs: dict[str, Run] = {}
        self._lock = threading.RLock()
        self._procs: dict[tuple[str, str], subprocess.Popen] = {}
        shutil.rmtree(self.root / STAGING, ignore_errors=True)  # previews of a studio that stopped mid-request
        self._recover()
        self._schedule()

    # ---- lookups

    def get(self, run_id: str) -> Run | None:
        """The run of that id; ids are looked up, never turned into paths."""
        with self._lock:
            return self.runs.get(run_id) if _ID.match(run_id or "") else None

    def list(self) -> list[Run]:
        with self._lock:
            return sorted(self.runs.values(), key=lambda r: r.created, reverse=True)

    def status(self, run: Run) -> dict[str, Any]:
        """What ``GET /api/runs/{id}`` answers."""
        with self._lock:
            train = run.jobs["train"]
            waiting = sorted(
                (j.queued, r.id) for r in self.runs.values() for j in r.jobs.values() if j.state == "queued"
            )
            position = next((i + 1 for i, (_, rid) in enumerate(waiting) if rid == run.id), None)
            steps = {
                kind: {"state": j.state, **j.params, "returncode": j.returncode}
                for kind, j in run.jobs.items()
                if kind != "train"
            }
            out = {
                "id": run.id,
                "state": train.state,
                **run.progress(),
                "created": run.created,
                "started": train.started,
                "ended": train.ended,
                "data": run.data_name,
                "card": run.card_name,
                "options": run.options,
                "device": run.device,
                "queue_position": position,
                "resumable": run.resumable,
                "adapter": (run.adapter / "adapter_model.safetensors").is_file() and train.state == "done",
                **steps,
            }
            if train.state in ("failed", "interrupted"):
                out["log_tail"] = _tail(run.log_path("train"))
            return out

    # ---- uploads and options

    def _name(self, upload: Upload, field_name: str, suffixes: tuple[str, ...]) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(upload.name or "").name)[-100:].lstrip(".")
        if not name.lower().endswith(suffixes):
            raise ConfigError(
                f"`{field_name}`: expected a {' or '.join(suffixes)} file, got {upload.name or 'no file name'!r}"
            )
        return name

    def _store(self, folder: Path, data: Upload, card: Upload | None) -> tuple[Path, Path | None]:
        """Copy the uploads into ``folder/uploads`` under their own (cleaned) names."""
        data_path = folder / "uploads" / self._name(data, "data", DATA_SUFFIXES)
        card_path = None
        if card is not None:
            card_path = data_path.with_name(self._name(card, "card", CARD_SUFFIXES))
            if card_path == data_path:
                card_path = data_path.with_name(f"card-{card_path.name}")
        data_path.parent.mkdir(parents=True)
        for upload, path in ((data, data_path), (card, card_path)):
            if upload is not None and path is not None:
                with path.open("wb") as f:
                    shutil.copyfileobj(upload.file, f)
        return data_path, card_path

    def _check_path_option(self, key: str, value: Any) -> None:
        if not isinstance(value, str) or value in ("", "embedded"):
            return  # a wrong type is load_config's to report
        p = Path(value).expanduser()
        if not (p.is_absolute() or value.startswith((".", "~")) or ".." in p.parts or p.exists()):
            return  # a hub id (org/name): no file is opened for it
        resolved = p.resolve()
        if not any(resolved.is_relative_to(r) for r in self.roots):
            raise ConfigError(
                f"`{key}` ({value}) names a path outside the studio's folders ({', '.join(map(str, self.roots))}): "
                "put it under --runs, or start the studio with --models DIR"
            )

    def train_config(self, options: Any, data: Path, card: Path | None, out: Path) -> TrainConfig:
        """``options`` (train's option names) checked by the CLI's own code, with the studio's files."""
        if not isinstance(options, dict):
            raise ConfigError('`options` must be a JSON object of train\'s options, e.g. {"max_steps": 4}')
        for key in options:
            if key in MANAGED:
                raise ConfigError(f"`{key}` is set by the studio: {MANAGED[key]}")
        for key in PATH_OPTIONS:
            if key in options:
                self._check_path_option(key, options[key])
        values = {**STUDIO_DEFAULTS, **options, "data": str(data), "output_dir": str(out)}
        if card is not None:
            values["character"] = str(card)
        return load_config(None, values)

    @contextmanager
    def staged(self, data: Upload, card: Upload | None, options: Any) -> Iterator[TrainConfig]:
        """The uploads in a scratch folder under the runs folder and their config, for a preview or a plan; the
        folder is removed afterwards. File names in errors are the uploaded ones."""
        folder = self.root / STAGING / secrets.token_hex(8)
        try:
            data_path, card_path = self._store(folder, data, card)
            with _upload_names(folder / "uploads"):
                yield self.train_config(options, data_path, card_path, folder / "adapter")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- steps

    def create(self, data: Upload, card: Upload | None, options: Any) -> Run:
        """A new run from the uploads and options (checked as ``chatlora train`` checks them, the data read
        whole), queued for its device; on a bad upload or option nothing is left behind."""
        from ..data import load_records, parse_columns

        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = self.root / run_id
        folder.mkdir()
        try:
            data_path, card_path = self._store(folder, data, card)
            with _upload_names(folder / "uploads"):
                cfg = self.train_config(options, data_path, card_path, folder / "adapter")
                load_records(cfg.data, cfg.format, parse_columns(cfg.columns))
            device = device_key(cfg.device)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        config = {k: v for k, v in cfg.to_dict().items() if k in options or k in ("data", "output_dir")}
        if card_path is not None:
            config["character"] = str(card_path)
        config.update({k: v for k, v in STUDIO_DEFAULTS.items() if k not in options})
        (folder / "train.yaml").write_text(
            f"# chatlora studio run {run_id}: {self.python} -m chatlora train --config {folder / 'train.yaml'}\n"
            + yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
            encoding="utf-8",
        )
        run = Run(run_id, folder, time.time(), data.name, card.name if card else None, dict(options), device)
        run.jobs["train"] = Job("train", self._chatlora("train", "--config", str(folder / "train.yaml")), device)
        with self._lock:
            run.save()
            self.runs[run_id] = run
            self._schedule()
        return run

    def resume(self, run: Run) -> None:
        """Queue the train step again, going on from the newest complete checkpoint (``train --resume``)."""
        with self._lock:
            if not run.resumable:
                raise RunStateError(
                    f"run {run.id} is {run.state}"
                    + (" with no complete checkpoint to resume from" if run.state != "running" else "")
                    + ": nothing to resume"
                )
            args = self._chatlora("train", "--config", str(run.folder / "train.yaml"), "--resume")
            run.jobs["train"] = Job("train", args, run.device)
            run.save()
            self._schedule()

    def evaluate(self, run: Run, options: Any) -> Job:
        """Queue ``chatlora eval`` on a finished run; ``options``: :data:`EVAL_OPTIONS`, checked by EvalConfig."""
        self._need_adapter(run)
        if not isinstance(options, dict):
            raise ConfigError("the eval options must be a JSON object")
        unknown = sorted(set(options) - set(EVAL_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown eval option(s) {', '.join(unknown)}; known: {', '.join(EVAL_OPTIONS)}")
        cfg = EvalConfig(adapter=str(run.adapter), **options)  # its checks, the CLI's
        argv = self._chatlora("eval", "--adapter", str(run.adapter), "--device", run.device)
        for key in EVAL_OPTIONS:
            value = getattr(cfg, key)
            if key == "persona":
                argv.append("--persona" if value else "--no-persona")
            elif value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        return self._queue_step(run, Job("eval", argv, run.device, params={"options": options}))

    def export(self, run: Run, options: Any) -> Job:
        """Queue ``chatlora export`` of a finished run into ``export-QUANT/`` (a new folder each time)."""
        self._need_adapter(run)
        if not isinstance(options, dict):
            raise ConfigError("the export options must be a JSON object")
        for key, value in options.items():
            kind = EXPORT_OPTIONS.get(key)
            if kind is None:
                raise ConfigError(f"unknown export option {key}; known: {', '.join(EXPORT_OPTIONS)}")
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
                raise ConfigError(f"export option `{key}` must be {'a number > 0' if kind is int else 'a string'}")
        quant = options.get("quant", "f16")
        if quant not in QUANTS:
            raise ConfigError(f"export option `quant` ({quant!r}) must be one of {', '.join(QUANTS)}")
        out = run.export_dir(quant)
        with self._lock:
            job = run.jobs.get("export")
            if job is not None and job.state in ("queued", "running"):
                raise RunStateError(f"run {run.id} is already exporting ({job.params.get('quant')})")
            if out.exists():
                shutil.rmtree(out)  # the studio's own folder from an earlier export of this quant, asked again
        argv = self._chatlora("export", "--adapter", str(run.adapter), "--output", str(out), "--quant", quant)
        for key in ("samples", "max_new_tokens"):
            if key in options:
                argv += [f"--{key.replace('_', '-')}", str(options[key])]
        return self._queue_step(run, Job("export", argv, run.device, params={"quant": quant, "folder": out.name}))

    def cancel(self, run: Run, kind: str = "train") -> None:
        """Cancel a queued step, or terminate a running one's process group (SIGTERM, then SIGKILL)."""
        with self._lock:
            job = run.jobs.get(kind)
            if job is None or job.state in FINAL:
                raise RunStateError(
                    f"run {run.id}: {kind} is {job.state if job else 'not started'}: nothing to cancel"
                )
            job.cancel_requested = True
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
                run.save()
                return
            run.save()
            pid = job.pid
        assert pid is not None
        _signal_group(pid, signal.SIGTERM)
        timer = threading.Timer(TERMINATE_GRACE_S, lambda: _alive(job) and _signal_group(pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def cancel_all(self) -> None:
        """Cancel every queued or running step (steps otherwise outlive the studio: a test's studio ends its own)."""
        with self._lock:
            pending = [(r, k) for r in self.runs.values() for k, j in r.jobs.items() if j.state not in FINAL]
        for run, kind in pending:
            try:
                self.cancel(run, kind)
            except RunStateError:
                pass  # it ended meanwhile
        deadline = time.monotonic() + TERMINATE_GRACE_S + 5
        while time.monotonic() < deadline and any(
            j.state not in FINAL for r in self.runs.values() for j in r.jobs.values()
        ):
            time.sleep(0.1)

    def _need_adapter(self, run: Run) -> None:
        if run.state != "done":
            raise RunStateError(f"run {run.id} is {run.state}: its adapter is written when training is done")

    def _queue_step(self, run: Run, job: Job) -> Job:
        with self._lock:
            old = run.jobs.get(job.kind)
            if old is not None and old.state in ("queued", "running"):
                raise RunStateError(f"run {run.id}: {job.kind} is already {old.state}")
            run.jobs[job.kind] = job
            run.save()
            self._schedule()
        return job

    def _chatlora(self, *args: str) -> list[str]:
        return [self.python, "-m", "chatlora", *args]

    # ---- scheduling

    def _schedule(self) -> None:
        """Start the oldest queued step of every device that runs none."""
        with self._lock:
            jobs = [(j, r) for r in self.runs.values() for j in r.jobs.values()]
            busy = {j.device for j, _ in jobs if j.state == "running"}
            for job, run in sorted((p for p in jobs if p[0].state == "queued"), key=lambda p: p[0].queued):
                if job.device not in busy:
                    self._start(run, job)
                    busy.add(job.device)

    def _start(self, run: Run, job: Job) -> None:
        rc = run.rc_path(job.kind)
        rc.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        with run.log_path(job.kind).open("ab") as logf:
            logf.write(f"\n$ {' '.join(job.argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                ["sh", "-c", '"$@"; echo $? > "$0"', str(rc), *job.argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cancel ends it all; Ctrl-C on the studio does not
                env=env,
            )
        job.state, job.started, job.pid, job.pid_start = "running", time.time(), proc.pid, _proc_start(proc.pid)
        run.save()
        self._procs[(run.id, job.kind)] = proc
        threading.Thread(target=self._wait, args=(run, job, proc), daemon=True, name=f"studio-{job.kind}").start()

    def _wait(self, run: Run, job: Job, proc: subprocess.Popen) -> None:
        proc.wait()
        _wait_group(proc.pid)  # the step's shell is gone; its chatlora process may still be on its way out
        self._finished(run, job)

    def _watch(self, run: Run, job: Job) -> None:
        """An adopted step (started by an earlier studio) is no child of ours: poll until its process is gone."""
        while _alive(job):
            time.sleep(self.poll_s)
        self._finished(run, job)

    def _finished(self, run: Run, job: Job) -> None:
        with self._lock:
            self._procs.pop((run.id, job.kind), None)
            if run.jobs.get(job.kind) is not job:
                return
            _settle(run, job)
            run.save()
            log.info("run %s: %s %s (exit code %s)", run.id, job.kind, job.state, job.returncode)
            self._schedule()

    def _recover(self) -> None:
        """Find the runs of an earlier studio; adopt steps still running, settle the ones that ended meanwhile."""
        for folder in sorted(p for p in self.root.iterdir() if _ID.match(p.name) and (p / RUN_FILE).is_file()):
            try:
                run = Run.load(folder)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable, skipped (%s)", folder / RUN_FILE, e)
                continue
            self.runs[run.id] = run
            for job in run.jobs.values():
                if job.state == "running" and _alive(job):
                    threading.Thread(target=self._watch, args=(run, job), daemon=True).start()
                elif job.state == "running":
                    _settle(run, job)
            run.save()


def _settle(run: Run, job: Job) -> None:
    """A step whose process is gone: its state from its exit code file (none: it was killed with its shell, as when
    the machine stops)."""
    job.returncode = _read_rc(run.rc_path(job.kind))
    job.ended = job.ended or time.time()
    if job.cancel_requested:
        job.state = "cancelled"
    elif job.returncode is None:
        job.state = "interrupted"
    else:
        job.state = "done" if job.returncode == 0 else "failed"


def _read_rc(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = re.sub(r"[^\n]*\r", "", text)  # progress bars redraw with \r: keep what each line showed last
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def _upload_names(uploads: Path) -> Iterator[None]:
    """Errors about the uploads name them as their sender did (``dialogues.jsonl:3: ...``), not by the folder the
    studio keeps them in."""
    try:
        yield
    except DataError as e:
        raise DataError([p.replace(f"{uploads}{os.sep}", "") for p in e.problems]) from None
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{uploads}{os.sep}", "")) from None
