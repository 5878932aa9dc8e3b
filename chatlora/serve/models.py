"""The served models: one base in memory, each adapter loaded into it under its own name (``/v1/models``)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..inference.infer import BASE, ChatModel
from ..model import (
    context_length,
    load_tokenizer,
    resolve_model,
)
from ..run import load_base, open_model, open_run

__all__ = ["ModelSet", "ServedModel", "load_models", "parse_adapters"]

log = logging.getLogger(__package__)  # one logger for the server: chatlora.serve

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------- models


@dataclass
class ServedModel:
    """One entry of ``/v1/models``: a chat view (tokenizer, system prompt) and the PEFT adapter it switches to."""

    name: str
    chat: ChatModel
    adapter: str | None  # PEFT adapter name; None = base model (adapters disabled)
    max_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        # The most text one token can stand for: UTF-8 bytes of the longest vocabulary entry (byte-level entries
        # like 'Ġ' count 2 for 1, an overestimate). Bounds a prompt's token count from below without tokenizing it.
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in self.chat.tokenizer.get_vocab()), default=1)


@dataclass
class ModelSet:
    """The served models, all sharing one network in memory."""

    models: dict[str, ServedModel]
    context_length: int
    created: int = field(default_factory=lambda: int(time.time()))


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``--adapter DIR`` or ``--adapter NAME=DIR`` flags -> ``{name: dir}`` (name defaults to the dir's name)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).is_dir():
            name, path = Path(spec).name, spec
        if not _NAME.match(name):
            raise ConfigError(f"--adapter {spec}: name {name!r} must be letters, digits, '.', '_' or '-' (NAME=DIR)")
        if name in out:
            raise ConfigError(f"--adapter {spec}: the name {name!r} is used twice; give NAME=DIR")
        out[name] = Path(path)
    return out


def load_models(
    adapters: Mapping[str, str | Path] | None = None,
    model: str | None = None,
    base_only: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> ModelSet:
    """Load the base once and every adapter into it by name; the base model is served too (adapters disabled).

    Args:
        adapters: ``{name: chatlora output dir}``; all must share one base model.
        model: base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapters' base.
        base_only: serve only the base model of the adapters.
        device: auto, cpu, cuda or cuda:N.
        dtype: the base's dtype: auto, fp32, bf16 or fp16 (:func:`~chatlora.model.dtype_for`).
    """
    adapters = {name: Path(d) for name, d in (adapters or {}).items()}
    if not adapters and not model:
        raise ModelError("give an adapter dir (a trained run) or a model (a base or merged model)")
    runs = {name: open_run(d) for name, d in adapters.items()}
    if model is None:
        specs = {name: run.base_spec for name, run in runs.items()}
        resolved = {resolve_model(s) for s in specs.values()}
        if len(resolved) > 1:
            raise ModelError(
                f"the adapters have different base models ({', '.join(sorted(set(specs.values())))}); "
                "serve them from separate processes"
            )
        model = next(iter(specs.values()))
    base_name = "embedded" if model in ("", "embedded") else Path(str(model).rstrip("/")).name
    if not _NAME.match(base_name):
        base_name = "base"
    if base_name in adapters:
        raise ModelError(f"adapter name {base_name!r} is the base model's name; give NAME=DIR with another name")

    attached = list(runs.values()) if not base_only else []
    net = load_base(model, device, dtype, attached)
    first = next(iter(runs.values()), None)
    # The base is served with the first run's system prompt, as `chatlora chat --base-only` does: fair comparisons.
    base_run = first or open_model(model)
    base_tok = base_run.tokenizer
    base_tok.padding_side = "left"
    served: dict[str, ServedModel] = {}
    for name, run in runs.items() if not base_only else ():
        net = run.attach(net, name)
        tok = load_tokenizer(str(run.path))  # its own instance: the base view's is the first run's
        tok.padding_side = "left"
        served[name] = ServedModel(name, ChatModel(net, tok, run.system_prompt, name, adapter=name), name)
        log.info("loaded adapter %s from %s", name, run.path)
    base_system = base_run.system_prompt
    base_chat = ChatModel(net, base_tok, base_system, base_name, adapter=BASE)
    served = {base_name: ServedModel(base_name, base_chat, None), **served}
    return ModelSet(served, context_length(net, base_tok))
