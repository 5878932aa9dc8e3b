"""Load test for `chatlora serve`: N concurrent streaming clients for a bounded time, then a summary table.

    # one run, side by side: a server per --max-batch value (`chatlora serve` subprocesses on free localhost ports),
    # started one after the other against the same load:
    .venv/bin/python bench/serve_load.py --serve "--model embedded" --max-batch 1,16 --clients 16 --duration 60
    # against a running server:
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --clients 64 --duration 45

Clients back off for the server's ``Retry-After`` on 429/503 (as the openai client does). Reports requests/s,
completion tokens/s, p50/p95 time to first token and latency, and errors by HTTP status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    statuses: Counter = field(default_factory=Counter)
    exceptions: Counter = field(default_factory=Counter)
    cut: int = 0  # requests still running at the hard stop: the client hangs up (the server must cancel them)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_client(client: httpx.AsyncClient, url: str, body: dict, deadline: float, stats: Stats) -> None:
    while time.monotonic() < deadline:
        start = time.monotonic()
        first = None
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    stats.statuses[r.status_code] += 1
                    await r.aread()
                    if r.status_code in (429, 503):
                        wait = float(r.headers.get("retry-after", "1"))
                        await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
                    continue
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        stats.exceptions["stream error: " + event["error"].get("code", "?")] += 1
                        break
                    if event.get("usage"):
                        stats.tokens += event["usage"]["completion_tokens"]
                    if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                        first = time.monotonic() - start
                if done:
                    stats.ok += 1
                    stats.statuses[200] += 1
                    stats.latency.append(time.monotonic() - start)
                    if first is not None:
                        stats.ttft.append(first)
                else:
                    stats.exceptions["stream ended without [DONE]"] += 1
        except (httpx.HTTPError, OSError) as e:
            stats.exceptions[type(e).__name__] += 1
            await asyncio.sleep(0.2)


async def run_load(
    url: str, models: list[str], clients: int, duration: float, grace: float, max_tokens: int, api_key: str | None
) -> Stats:
    """``clients`` clients, client i asking ``models[i % len(models)]``."""
    stats = Stats()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "messages": [{"role": "user", "content": "Tell me a short fact about the sea."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0.7,
    }
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(connect=10, read=600, write=10, pool=10)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        deadline = time.monotonic() + duration
        tasks = [
            asyncio.create_task(one_client(client, url, {**body, "model": models[i % len(models)]}, deadline, stats))
            for i in range(clients)
        ]
        _, pending = await asyncio.wait(tasks, timeout=duration + grace)
        stats.cut = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{url}/health did not answer within {timeout:.0f}s")


def measure(args, url: str | None, serve_flags: str) -> tuple[list[tuple[str, str]], bool]:
    """Start a server with ``serve_flags`` (unless ``url``), run the load against it, return the table's rows."""
    proc = None
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "chatlora", "serve", *shlex.split(serve_flags), "--port", str(port)]
        log_path = os.path.join(tempfile.gettempdir(), f"serve_load.server.{port}.log")
        print("starting:", " ".join(cmd), f"(server log: {log_path})", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))  # noqa: SIM115
    try:
        wait_healthy(url, proc)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = args.model.split(",") if args.model else []
        if not models:
            models = [httpx.get(url + "/v1/models", headers=headers).json()["data"][-1]["id"]]
        print(f"{args.clients} streaming clients for {args.duration:.0f}s against {url} models={models}", flush=True)
        started = time.monotonic()
        stats = asyncio.run(
            run_load(url, models, args.clients, args.duration, args.grace, args.max_tokens, args.api_key)
        )
        wall = time.monotonic() - started
        alive = proc is None or proc.poll() is None
        healthy = alive and httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    rows = [
        ("wall time (s)", f"{wall:.1f}"),
        ("completed requests", str(stats.ok)),
        ("requests/s", f"{stats.ok / wall:.2f}"),
        ("completion tokens/s", f"{stats.tokens / wall:.1f}"),
        ("TTFT p50 / p95 (s)", f"{pct(stats.ttft, 50):.2f} / {pct(stats.ttft, 95):.2f}"),
        ("latency p50 / p95 (s)", f"{pct(stats.latency, 50):.2f} / {pct(stats.latency, 95):.2f}"),
        ("mean latency (s)", f"{statistics.fmean(stats.latency):.2f}" if stats.latency else "nan"),
        ("responses by status", ", ".join(f"{k}: {v}" for k, v in sorted(stats.statuses.items())) or "-"),
        ("hung up at the hard stop", str(stats.cut)),
        ("client errors", ", ".join(f"{k}: {v}" for k, v in stats.exceptions.items()) or "0"),
        ("5xx other than 503", str(sum(v for k, v in stats.statuses.items() if k >= 500 and k != 503))),
        ("server alive + healthy after", "yes" if healthy else "NO"),
    ]
    return rows, healthy and not stats.exceptions


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (else --serve starts one)")
    p.add_argument("--serve", default="--model embedded", help="flags for `chatlora serve` when no --url is given")
    p.add_argument(
        "--max-batch",
        default=None,
        metavar="A,B",
        help="start one server per value (`--serve ... --max-batch A`), one after the other, and print them side by "
        "side, with B's tokens/s over A's",
    )
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=45, help="seconds during which clients start new requests")
    p.add_argument("--grace", type=float, default=15, help="then seconds to finish; later ones are hung up on")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--model",
        default=None,
        help="model id to ask, or A,B,...: client i asks the i-th modulo their number (default: the last one "
        "/v1/models lists)",
    )
    p.add_argument("--api-key", default=os.environ.get("CHATLORA_API_KEY"))
    args = p.parse_args()
    if args.max_batch and args.url:
        p.error("--max-batch starts its own servers: give --serve flags, not --url")

    columns: dict[str, list[tuple[str, str]]] = {}
    ok = True
    sides = [int(b) for b in args.max_batch.split(",")] if args.max_batch else [None]
    for b in sides:
        flags = args.serve if b is None else f"{args.serve} --max-batch {b}"
        rows, good = measure(args, args.url, flags)
        columns["result" if b is None else f"--max-batch {b}"] = rows
        ok = ok and good
    names = list(columns)
    table = [("", *names)] + [(k, *(columns[n][i][1] for n in names)) for i, (k, _) in enumerate(columns[names[0]])]
    if len(names) > 1:
        rate = [float(dict(columns[n])["completion tokens/s"]) for n in names]
        table.append((f"tokens/s vs {names[0]}", *(f"{r / rate[0]:.2f}x" if rate[0] else "-" for r in rate)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for j, row in enumerate(table):
        print("| " + " | ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
