"""The studio's web app: the page, and the API it uses (README "Studio"), on serve's server stack and guards."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import threading
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..config import TrainConfig, field_type
from ..errors import ChatloraError, ConfigError, DataError
from ..serve import ApiError, _add_error_handlers, _add_guards, _bind, _server_config
from ..serve import create_app as serve_app
from .runs import FINAL, Run, RunsManager, RunStateError, Upload, read_metrics

__all__ = ["create_app", "run"]

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 2**20  # --max-upload-mb
EVENT_POLL_S = 0.5  # how often the events stream looks for new metrics lines
PREVIEW_RECORDS = 3
STATIC = ("index.html", "studio.js", "chart.js", "studio.css")
_CHAT = re.compile(r"^/api/runs/([^/]+)/v1(/.*)$")


# ---------------------------------------------------------------- errors


def _user_error(e: ChatloraError) -> ApiError:
    if isinstance(e, RunStateError):
        return ApiError(409, str(e), None, "conflict")
    if isinstance(e, DataError):
        return ApiError(400, "\n".join(e.problems), "data", "invalid_data")
    return ApiError(400, str(e), None, "invalid_request")


async def _call(fn: Callable, *args: Any) -> Any:
    """``fn`` in a worker thread (it reads files, tokenizes, plans), a user error answered as a 400 or 409."""
    try:
        return await run_in_threadpool(fn, *args)
    except ChatloraError as e:
        raise _user_error(e) from None


def _run_or_404(manager: RunsManager, run_id: str) -> Run:
    run = manager.get(run_id)
    if run is None:
        raise ApiError(404, f"no run {run_id[:40]!r} in this studio", None, "run_not_found")
    return run


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


async def _uploads(request: Request) -> tuple[Upload, Upload | None, Any]:
    """The multipart fields ``data`` (a file), ``card`` (a file, optional) and ``options`` (a JSON object)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the fields data, card and options as multipart/form-data", None, "unsupported_media")
    form = await request.form(max_files=2, max_fields=4)
    data, card, options = form.get("data"), form.get("card"), form.get("options", "{}")
    if not isinstance(data, UploadFile):
        raise ApiError(400, "the `data` field must be a dataset file (JSON or JSONL)", "data", "missing_data")
    if card is not None and not isinstance(card, UploadFile):
        raise ApiError(400, "the `card` field must be a character card file (JSON)", "card", "invalid_card")
    if not isinstance(options, str):
        raise ApiError(400, "the `options` field must be a JSON object, not a file", "options", "invalid_options")
    try:
        parsed = json.loads(options or "{}")
    except ValueError as e:
        raise ApiError(400, f"`options` is not valid JSON: {e}", "options", "invalid_options") from None
    card_upload = Upload(card.filename or "", card.file) if card is not None and card.filename else None
    return Upload(data.filename or "", data.file), card_upload, parsed


# ---------------------------------------------------------------- preview and plan


def preview(manager: RunsManager, data: Upload, card: Upload | None, options: Any) -> dict[str, Any]:
    """``data check`` and ``data show`` of the uploads, as train would read them with ``options``."""
    from ..show import check_data, show_records

    with manager.staged(data, card, options) as cfg:
        stats, warnings = check_data(cfg.data, cfg.format, cfg.columns, cfg.model, cfg.system_prompt, cfg.max_length)
        shown = show_records(cfg, PREVIEW_RECORDS)
        uploads = str(Path(cfg.data).parent) + "/"
    return {
        "stats": stats,
        "warnings": [w.replace(uploads, "") for w in warnings],
        "records": [
            {
                "line": r.line,
                "tokens": len(r.tokens),
                "trained": sum(t.trained for t in r.tokens),
                "control": sum(t.control for t in r.tokens),
                "truncated": r.truncated,
                "runs": [list(run) for run in r.runs],
            }
            for r in shown
        ],
    }


def plan(manager: RunsManager, data: Upload, card: Upload | None, options: Any) -> dict[str, Any]:
    """``train --dry-run``: split, speed-ups, micro-batches, memory against what is free; no weights load."""
    from ..training.train import prepare_run

    with manager.staged(data, card, options) as cfg:
        prepared = prepare_run(cfg)
        uploads = str(Path(cfg.data).parent) + "/"
        per_epoch = prepared.plan.batches.steps_per_epoch
        steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * per_epoch)
        return {
            "lines": [line.replace(uploads, "") for line in prepared.lines()],
            "steps": steps,
            "steps_per_epoch": per_epoch,
            "train_records": len(prepared.split.train),
            "held_out_records": len(prepared.split.val),
            "plan": prepared.plan.to_dict(),
        }


# The recipes of configs/ offered as presets (found beside the package in a source checkout): their options without
# the files and the Huanhuan persona they name (a studio run brings its own data and card).
PRESETS = {"quickstart CPU recipe": "quickstart-cpu.yaml", "Yi-6B-Chat recipe": "yi-6b-chat-huanhuan.yaml"}
PRESET_DROPS = ("data", "output_dir", "system_prompt", "character", "persona")


def presets() -> dict[str, dict[str, Any]]:
    """``{name: options}`` of the shipped recipes, and QLoRA (the Yi recipe with its base in 4 bits)."""
    import yaml

    folder = Path(__file__).resolve().parents[2] / "configs"
    out: dict[str, dict[str, Any]] = {}
    for name, file in PRESETS.items():
        if (folder / file).is_file():
            loaded = yaml.safe_load((folder / file).read_text(encoding="utf-8")) or {}
            out[name] = {k: v for k, v in loaded.items() if k not in PRESET_DROPS}
    if "Yi-6B-Chat recipe" in out:
        out["QLoRA (Yi recipe, 4-bit base, GPU)"] = {**out["Yi-6B-Chat recipe"], "quantize": "4bit"}
    return out


def train_options() -> list[dict[str, Any]]:
    """train's options as the page offers them: name, type, default and help (the flags' own)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("yaml_only"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = field_type(f)
        out.append({"name": f.name, "type": kind.__name__, "default": default, "help": f.metadata["help"]})
    return out


# ---------------------------------------------------------------- steps' results


def eval_result(run: Run) -> dict[str, Any]:
    job = run.jobs.get("eval")
    out: dict[str, Any] = {"state": job.state if job else None}
    metrics = run.adapter / "eval" / "metrics.json"
    if job is not None and job.state == "done" and metrics.is_file():
        out["metrics"] = json.loads(metrics.read_text(encoding="utf-8"))
        out["report"] = f"/api/runs/{run.id}/files/adapter/eval/report.html"
    if job is not None and job.state in ("failed", "interrupted"):
        out["log_tail"] = _log_tail(run, "eval")
    return out


def export_result(run: Run) -> dict[str, Any]:
    from ..export import MANIFEST, run_commands

    job = run.jobs.get("export")
    out: dict[str, Any] = {"state": job.state if job else None}
    if job is None or job.state not in FINAL:
        return out
    folder = run.folder / job.params["folder"]
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        out["quant"] = manifest.get("quant")
        out["parity"] = manifest.get("parity", [])
        out["files"] = [
            {"name": p.name, "bytes": p.stat().st_size, "url": f"/api/runs/{run.id}/files/{folder.name}/{p.name}"}
            for p in sorted(folder.iterdir())
            if p.is_file()
        ]
        out["commands"] = run_commands(folder) if job.state == "done" else []
    if job.state != "done":
        out["log_tail"] = _log_tail(run, "export")
    return out


def _log_tail(run: Run, kind: str) -> str:
    from .runs import _tail

    return _tail(run.log_path(kind))


def adapter_zip(run: Run) -> Path:
    """The adapter folder's top-level files (adapter, tokenizer, run card, metrics, plot) as one zip; checkpoints
    and the eval report stay out."""
    path = run.folder / "adapter.zip"
    files = sorted(p for p in run.adapter.iterdir() if p.is_file())
    newest = max(p.stat().st_mtime for p in files)
    if not path.is_file() or path.stat().st_mtime < newest:
        tmp = path.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in files:
                z.write(p, f"{run.id}/{p.name}")
        tmp.replace(path)
    return path


# ---------------------------------------------------------------- events


async def _events(run: Run, manager: RunsManager, request: Request) -> AsyncIterator[str]:
    """``metrics.jsonl`` line by line as server-sent events (id: the line number), from the start, then following
    the file; ``state`` events when the run's state changes or a checkpoint sample comes in; ``end`` when the run
    is over and all is sent."""
    offset, line_no, last = 0, 0, None
    while True:
        status = await run_in_threadpool(manager.status, run)
        try:
            size = run.metrics.stat().st_size
        except OSError:
            size = 0
        if size < offset:  # a resume trims the lines past its checkpoint: start over
            offset, line_no = 0, 0
            yield "event: reset\ndata: {}\n\n"
        if size > offset:
            with run.metrics.open("rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                line_no += 1
                if line.strip():
                    yield f"id: {line_no}\ndata: {line}\n\n"
        if (status["state"], len(status["samples"])) != last:  # a new state, or a new checkpoint sample
            last = (status["state"], len(status["samples"]))
            yield f"event: state\ndata: {json.dumps(status)}\n\n"
        if status["state"] in FINAL and offset >= size:
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)


# ---------------------------------------------------------------- chat


class _ChatApps:
    """One run's adapter and its base behind serve's OpenAI-compatible app, loaded on first use."""

    def __init__(self, manager: RunsManager) -> None:
        self.manager, self.apps, self._lock = manager, {}, threading.Lock()

    def get(self, run_id: str):
        run = self.manager.get(run_id)
        if run is None:
            raise ApiError(404, f"no run {run_id[:40]!r} in this studio", None, "run_not_found")
        if run.state != "done":
            raise ApiError(409, f"run {run.id} is {run.state}: chat opens when training is done", None, "conflict")
        with self._lock:
            if run_id not in self.apps:
                from ..serve import load_models

                try:
                    models = load_models({"tuned": run.adapter}, device=run.device)
                except ChatloraError as e:
                    raise _user_error(e) from None
                # the studio's guards (key, Host, Origin, size) stand in front of this app
                self.apps[run_id] = serve_app(models, default_max_tokens=128, allowed_hosts=["*"])
            return self.apps[run_id]


class _ChatRoutes:
    """ASGI middleware: ``/api/runs/{id}/v1/...`` goes to that run's chat app (``/v1/models``,
    ``/v1/chat/completions``), everything else to the studio."""

    def __init__(self, app, chats: _ChatApps) -> None:
        self.app, self.chats = app, chats

    async def __call__(self, scope, receive, send) -> None:
        match = _CHAT.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        try:
            inner = await run_in_threadpool(self.chats.get, match[1])
        except ApiError as e:
            await JSONResponse(e.body(), e.status)(scope, receive, send)
            return
        path = "/v1" + match[2]
        await inner({**scope, "path": path, "raw_path": path.encode()}, receive, send)


# ---------------------------------------------------------------- the app


def _add_page_routes(app: FastAPI) -> None:
    static = resources.files("chatlora").joinpath("studio/static")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def asset(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no asset {name[:40]!r}", None, "not_found")
        media = {"js": "text/javascript", "css": "text/css", "html": "text/html"}[name.rpartition(".")[2]]
        return Response(static.joinpath(name).read_bytes(), media_type=media + "; charset=utf-8")


def _add_run_routes(app: FastAPI, manager: RunsManager) -> None:
    @app.get("/api/info")
    async def info():
        from ..export import QUANTS

        return {
            "runs": str(manager.root),
            "train_options": train_options(),
            "presets": presets(),
            "quants": list(QUANTS),
        }

    @app.post("/api/preview")
    async def post_preview(request: Request):
        return await _call(preview, manager, *await _uploads(request))

    @app.post("/api/plan")
    async def post_plan(request: Request):
        return await _call(plan, manager, *await _uploads(request))

    @app.post("/api/runs", status_code=201)
    async def create_run(request: Request):
        run = await _call(manager.create, *await _uploads(request))
        return JSONResponse(await run_in_threadpool(manager.status, run), 201, {"Location": f"/api/runs/{run.id}"})

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": [await run_in_threadpool(manager.status, r) for r in manager.list()]}

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str):
        return await run_in_threadpool(manager.status, _run_or_404(manager, run_id))

    @app.get("/api/runs/{run_id}/events")
    async def events(run_id: str, request: Request):
        run = _run_or_404(manager, run_id)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_events(run, manager, request), media_type="text/event-stream", headers=headers)

    @app.get("/api/runs/{run_id}/metrics")
    async def metrics(run_id: str):
        return {"rows": await run_in_threadpool(read_metrics, _run_or_404(manager, run_id).metrics)}

    @app.post("/api/runs/{run_id}/cancel")
    async def cancel(run_id: str, request: Request):
        run = _run_or_404(manager, run_id)
        step = (await _json(request)).get("step", "train")
        await _call(manager.cancel, run, step)
        return await run_in_threadpool(manager.status, run)

    @app.post("/api/runs/{run_id}/resume")
    async def resume(run_id: str):
        run = _run_or_404(manager, run_id)
        await _call(manager.resume, run)
        return await run_in_threadpool(manager.status, run)

    _add_step_routes(app, manager, "eval", manager.evaluate, eval_result)
    _add_step_routes(app, manager, "export", manager.export, export_result)

    @app.get("/api/runs/{run_id}/log")
    async def get_log(run_id: str, step: str = "train"):
        run = _run_or_404(manager, run_id)
        if step not in run.jobs:
            raise ApiError(404, f"run {run.id} has no {step[:20]!r} step", "step", "not_found")
        return PlainTextResponse(_read_log(run.log_path(step)))

    @app.get("/api/runs/{run_id}/adapter.zip")
    async def download_adapter(run_id: str):
        run = _run_or_404(manager, run_id)
        if run.state != "done":
            raise ApiError(
                409, f"run {run.id} is {run.state}: the adapter is written when it is done", None, "conflict"
            )
        return FileResponse(await run_in_threadpool(adapter_zip, run), filename=f"chatlora-{run.id}.zip")

    @app.get("/api/runs/{run_id}/files/{rel:path}")
    async def download(run_id: str, rel: str):
        run = _run_or_404(manager, run_id)
        folder = run.folder.resolve()
        path = (folder / rel).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise ApiError(404, f"no file {rel[:80]!r} in run {run.id}", None, "not_found")
        return FileResponse(path)


def _add_step_routes(app: FastAPI, manager: RunsManager, step: str, start: Callable, result: Callable) -> None:
    """``POST /api/runs/{id}/STEP`` (JSON options) queues the step: 202; ``GET`` answers its state and results."""

    @app.post(f"/api/runs/{{run_id}}/{step}", status_code=202, name=f"start_{step}")
    async def start_step(run_id: str, request: Request):
        run = _run_or_404(manager, run_id)
        await _call(start, run, await _json(request))
        return result(run)

    @app.get(f"/api/runs/{{run_id}}/{step}", name=f"get_{step}")
    async def get_step(run_id: str):
        return await run_in_threadpool(result, _run_or_404(manager, run_id))


def _read_log(path: Path, limit: int = 256 * 2**10) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def create_app(
    manager: RunsManager,
    api_key: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The studio app over ``manager``'s runs.

    Args:
        api_key: if set, every ``/api/*`` call needs ``Authorization: Bearer <api_key>``. Without one, ``Host`` must
            be an IP address, localhost or in ``allowed_hosts`` and a browser's ``Origin`` the studio's own or one
            matching ``allowed_origins``: a page elsewhere cannot start a run (serve's guards).
        max_upload_bytes: larger request bodies get 413 before a byte is read.
    """
    if max_upload_bytes <= 0:
        raise ConfigError("--max-upload-mb must be > 0")
    app = FastAPI(title="chatlora studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    _add_error_handlers(app)
    _add_page_routes(app)
    _add_run_routes(app, manager)
    app.add_middleware(_ChatRoutes, chats=_ChatApps(manager))  # inside the guards: they apply to chat too
    key = api_key.encode() if api_key else None
    media = ("application/json", "multipart/form-data")
    _add_guards(app, key, allowed_hosts, allowed_origins, max_upload_bytes, api_prefix="/api/", media_types=media)
    return app


def run(
    runs: str | Path = "runs/studio",
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    model_roots: Sequence[str | Path] = (),
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
) -> None:
    """Serve the studio with uvicorn until interrupted; runs in progress go on (a restarted studio adopts them).
    Without an ``api_key``, the environment's ``CHATLORA_API_KEY`` is the key."""
    import uvicorn

    api_key = api_key or os.environ.get("CHATLORA_API_KEY") or None

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    if host not in ("localhost", "127.0.0.1", "::1") and not api_key:
        log.warning("studio on %s without --api-key: anyone who can reach this port can train and read runs", host)
    sock = _bind(host, port)
    try:
        manager = RunsManager(runs, tuple(model_roots))
        app = create_app(manager, api_key, max_upload_bytes, [host, *allowed_hosts], allowed_origins)
        bound = sock.getsockname()[1]
        url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
        log.info("chatlora studio on %s (runs in %s: %d found)", url, manager.root, len(manager.runs))
        uvicorn.Server(_server_config(app, host, port)).run(sockets=[sock])
    finally:
        sock.close()
