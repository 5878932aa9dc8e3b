"""The settings of the commands that do not train (sampling, eval, serve): typed dataclasses with help on every
field, free of torch, so that the CLI takes its flags' defaults and help from them without loading a model library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["EvalConfig", "SamplingConfig", "ServeConfig", "setting_default", "setting_help"]


def _setting(default: Any, help_: str, **bounds) -> Any:
    return field(default=default, metadata={"help": help_, **bounds})


def setting_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``cls``."""
    return next(f.default for f in fields(cls) if f.name == name)


def setting_help(cls: type, name: str) -> str:
    """The help of field ``name`` of ``cls``."""
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


@dataclass
class SamplingConfig:
    """Decoding settings, with the ranges they must lie in (checked alike for CLI flags and server requests).

    ``temperature == 0`` means greedy decoding. ``seed`` makes a sampled reply reproducible: a row draws from its own
    generator, so the same seed, prompt, settings and model give the same reply whatever else shares its batch (up to
    the last-bit differences batched matrix products may have on a GPU).
    """

    max_new_tokens: int = _setting(256, "reply token limit", ge=1)
    temperature: float = _setting(0.7, "0 for greedy", ge=0, le=2)
    top_p: float = _setting(0.9, "nucleus sampling mass", gt=0, le=1)
    top_k: int = _setting(50, "sample among the k likeliest tokens (0: all)", ge=0, le=10**6)
    repetition_penalty: float = _setting(1.1, "divides the scores of tokens already present (1: off)", gt=0, le=100)
    presence_penalty: float = _setting(
        0.0, "subtracted from a token's score once it is in the reply (OpenAI's; 0: off)", ge=-2, le=2
    )
    frequency_penalty: float = _setting(
        0.0, "subtracted from a token's score per time it is in the reply (OpenAI's; 0: off)", ge=-2, le=2
    )
    seed: int | None = _setting(None, "sampling seed, for reproducible replies")
    logit_bias: Mapping[int, float] | None = field(
        default=None, metadata={"help": "added to these token ids' scores before sampling (OpenAI's logit_bias)"}
    )

    @classmethod
    def bounds(cls, name: str) -> dict[str, float]:
        """The range of field ``name`` as ``{"ge"|"gt"|"le": value}`` (pydantic's ``Field`` keywords)."""
        meta = next(f.metadata for f in fields(cls) if f.name == name)
        return {k: v for k, v in meta.items() if k in ("ge", "gt", "le")}

    def problems(self) -> list[tuple[str, str]]:
        """``(field, "must be ...")`` for each value outside its range."""
        out = []
        for f in fields(self):
            value, b = getattr(self, f.name), self.bounds(f.name)
            if value is None or not b:
                continue
            low = ("ge", ">=", value >= b["ge"]) if "ge" in b else ("gt", ">", value > b["gt"]) if "gt" in b else None
            ok = (low is None or low[2]) and ("le" not in b or value <= b["le"])
            if not ok:
                parts = [f"{low[1]} {b[low[0]]}"] if low else []
                parts += [f"<= {b['le']}"] if "le" in b else []
                out.append((f.name, "must be " + " and ".join(parts)))
        return out

    def check(self) -> SamplingConfig:
        """Raise ConfigError naming the first value outside its range; return self."""
        bad = self.problems()
        if bad:
            raise ConfigError(f"{bad[0][0]} {bad[0][1]}, got {getattr(self, bad[0][0])}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class EvalConfig:
    """What ``chatlora eval`` measures and where it writes; each field is the flag of the same name."""

    adapter: str | Path = field(metadata={"help": "a chatlora output dir (adapter + run card + metrics.jsonl)"})
    against: str | Path = _setting(
        "base",
        "what the adapter is compared with: base (the base model, adapter off) or another chatlora run of the same "
        "base model, e.g. the SFT run a preference run started from",
    )
    data: str | Path | None = _setting(
        None, "evaluate this dataset file (its first records) instead of the held-out split"
    )
    format: str = _setting("auto", "format of --data: auto, alpaca, messages or sharegpt")
    columns: str | None = _setting(None, "field renames for --data, e.g. instruction=prompt,output=response")
    output: str | Path | None = _setting(None, "report folder (default: ADAPTER/eval)")
    max_samples: int | None = _setting(None, "evaluate at most this many records (None: all)")
    max_new_tokens: int = _setting(128, "reply token limit; a reply that reaches it counts as not stopped")
    batch_size: int = _setting(8, "conversations per forward / generate batch")
    repetition_penalty: float = _setting(1.1, "greedy decoding's repetition penalty (1.0: plain greedy)")
    examples: int = _setting(10, "replies shown side by side in the report (all go to replies.jsonl)")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N (ignored when evaluate is given a loaded model)")
    dtype: str = _setting("auto", "the base model's dtype: auto, fp32, bf16, fp16 (ignored when given a loaded model)")
    persona: bool = _setting(True, "the persona section: identity probes, drift, retention (README Persona eval)")
    persona_config: str | Path | None = _setting(None, "a training YAML whose persona: block replaces the run's")

    def __post_init__(self) -> None:
        checks = [
            (self.max_samples is None or self.max_samples > 0, "--max-samples must be > 0"),
            (self.max_new_tokens > 0, "--max-new-tokens must be > 0"),
            (self.batch_size > 0, "--batch-size must be > 0"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "--repetition-penalty must be > 0",
            ),
            (self.examples >= 0, "--examples must be >= 0"),
            (
                self.data is not None or (self.format == "auto" and not self.columns),
                "--format and --columns apply to --data only (the held-out split uses the run's own)",
            ),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(why)

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output is not None else Path(self.adapter) / "eval"


# ---------------------------------------------------------------- serve

# Defaults of the server's limits (the `chatlora serve` flags of the same names).
MAX_BODY_BYTES = 8 * 2**20  # --max-body-mb
MAX_MESSAGES = 1000  # --max-messages
READ_TIMEOUT_S = 30.0  # --read-timeout: to receive a whole request, headers and body
KEEP_ALIVE_S = 5.0  # --timeout-keep-alive: idle time between requests on one connection
MAX_CONNECTIONS = 128  # --max-connections


@dataclass
class ServeConfig:
    """What ``chatlora serve`` loads and how it serves: every field is the flag of the same name (``--max-tokens`` for
    ``default_max_tokens``, ``--max-body-mb`` for ``max_body_bytes``). :meth:`check` is what the server enforces."""

    adapters: Mapping[str, str | Path] = field(
        default_factory=dict, metadata={"help": "{name: chatlora output dir}; all share one base model"}
    )
    model: str | None = _setting(
        None, "base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapters' base"
    )
    base_only: bool = _setting(False, "serve only the base model of the adapters")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _setting("auto", "the base model's dtype: auto, fp32, bf16 or fp16")
    host: str = _setting("127.0.0.1", "bind address (127.0.0.1: this machine only)")
    port: int = _setting(8000, "TCP port, 1-65535")
    api_key: str | None = _setting(None, "require 'Authorization: Bearer KEY' on /v1 (env CHATLORA_API_KEY)")
    max_queue: int = _setting(16, "requests waiting beyond a full batch; more get 503")
    max_batch: int | None = _setting(
        None, "requests generated together; 1: one at a time (None: 64 on a GPU, 8 on the CPU)"
    )
    log_prompts: bool = _setting(False, "also log request messages (off: prompts stay private)")
    default_max_tokens: int = _setting(256, "reply limit when a request sets none")
    max_body_bytes: int = _setting(MAX_BODY_BYTES, "larger request bodies get 413")
    max_messages: int = _setting(MAX_MESSAGES, "requests with more messages get 400")
    read_timeout: float = _setting(
        READ_TIMEOUT_S, "seconds a client has to send a whole request, headers and body; slower ones are dropped"
    )
    timeout_keep_alive: float = _setting(KEEP_ALIVE_S, "seconds an idle connection stays open")
    max_connections: int = _setting(MAX_CONNECTIONS, "open connections; more get 503")
    allowed_hosts: Sequence[str] = _setting(
        (), "Host names accepted besides IP addresses, localhost and --host ('*': any); checked without --api-key"
    )
    allowed_origins: Sequence[str] = _setting(
        (),
        "browser origins allowed besides the page's own, globs like http://localhost:* ('*': any), also answered "
        "with CORS headers (env CHATLORA_ORIGINS)",
    )

    def check(self) -> ServeConfig:
        """Raise ConfigError naming the flag of the first value the server cannot run with; return self."""
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            # the OS takes the port modulo 65536 (99999 served on 34463) and 0 picks a random one
            raise ConfigError(f"--port must be between 1 and 65535, got {port}")
        checks = [
            (self.max_queue >= 0, "--max-queue must be >= 0"),
            (self.max_batch is None or self.max_batch > 0, "--max-batch must be > 0"),
            (self.default_max_tokens > 0, "--max-tokens must be > 0"),
            (self.max_body_bytes > 0, "--max-body-mb must be > 0"),
            (self.max_messages > 0, "--max-messages must be > 0"),
            (self.read_timeout > 0, "--read-timeout must be > 0"),
            (self.timeout_keep_alive > 0, "--timeout-keep-alive must be > 0"),
            (self.max_connections > 0, "--max-connections must be > 0"),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(why)
        return self
