"""Test helpers for the server: a live uvicorn in a background thread, random LoRA adapters like a run's, and a
headless browser page."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from chatlora.serve import KEEP_ALIVE_S, MAX_CONNECTIONS, READ_TIMEOUT_S, _server_config


def make_adapter(base_dir: Path, out: Path, seed: int, dora: bool = False) -> Path:
    """A random (non-zero) LoRA (or DoRA) adapter for ``base_dir``, saved with its tokenizer like a chatlora run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatlora.model import load_tokenizer

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(
        r=4,
        lora_alpha=256,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
        use_dora=dora,
    )
    get_peft_model(net, config).save_pretrained(out)
    load_tokenizer(str(base_dir)).save_pretrained(out)
    return out


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread on a free localhost port (for tests and benchmarks).

    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``. The keyword options are :func:`run`'s.
    """

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = READ_TIMEOUT_S,
        timeout_keep_alive: float = KEEP_ALIVE_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        import uvicorn

        config = _server_config(app, host, port, read_timeout, timeout_keep_alive, max_connections, graceful_s=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def browser_page(timeout_ms: int = 60_000, **page_options):
    """A page in Debian's headless Chromium driven by Playwright, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(**page_options)
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()
