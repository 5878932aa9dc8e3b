"""What is exported: a chatlora run (adapter + run card) or a merged model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ChatloraError, ModelError
from ..model import EMBEDDED, embedded_gguf, load_model, load_tokenizer
from ..run import Run, held_out_records, open_run
from ..runcard import added_system_prompt, read_run_card, system_prompt, system_prompt_note
from ..template import with_system


@dataclass
class _Source:
    kind: str  # "adapter" or "model"
    path: Path
    card: dict[str, Any]
    tokenizer: Any
    base_spec: str | None = None
    run: Run | None = None  # the opened run, for an adapter

    @property
    def system_prompt(self) -> str | None:
        """The run's one system prompt (the Modelfile's SYSTEM); None when it had none or one per conversation."""
        return system_prompt(self.card)

    @property
    def system_note(self) -> str:
        """Why there is no SYSTEM ('' when there is one, or the run card does not say)."""
        return system_prompt_note(self.card)

    @property
    def stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.resolve().name).strip("-") or "model"


def _open_source(adapter: str | Path | None, model: str | Path | None) -> _Source:
    if (adapter is None) == (model is None):
        raise ModelError("give exactly one of --adapter DIR (a chatlora run) or --model DIR (a merged model)")
    if adapter is not None:
        run = open_run(adapter)
        return _Source("adapter", run.path, run.card, run.tokenizer, run.base_spec, run)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json here; --model takes a merged model directory (chatlora merge)")
    return _Source("model", path, read_run_card(path), load_tokenizer(str(path)))


def _reference_model(src: _Source):
    """The model the export must reproduce, in fp32: base + adapter merged, or the merged model as saved."""
    if src.kind == "model":
        return load_model(str(src.path)).eval()
    return src.run.merged(torch.float32)


def _base_gguf(src: _Source) -> Path | None:
    """The base model's own GGUF file, when it was given as one (a LoRA GGUF needs the exact base it was tuned on)."""
    spec = src.base_spec
    if spec in (None, "", EMBEDDED):
        return embedded_gguf()
    return Path(spec).resolve() if str(spec).endswith(".gguf") else None


_BUILTIN_PROMPTS = ["你是谁？", "皇上今日为何闷闷不乐？", "Tell me about yourself in one sentence."]


def _conversations(src: _Source, samples: int) -> tuple[list[list[dict]], str]:
    """Held-out conversations from the run card, each ending on its reference reply and rendered as training did
    (their own system prompt, else the one training added); without them, built-in prompts with the run's SYSTEM."""
    try:
        records, _ = held_out_records(src.card, samples)
        why = "the run card's held-out split is empty"
    except ChatloraError as e:  # no usable held-out split (none recorded, the data gone or changed): built-in prompts
        records, why = [], str(e).splitlines()[0]
    if not records:
        convs = [[{"role": "user", "content": p}] for p in _BUILTIN_PROMPTS[:samples]]
        return [with_system(c, src.system_prompt) for c in convs], f"{len(convs)} built-in prompts: {why}"
    added = added_system_prompt(src.card)
    convs = [with_system([dict(m) for m in r.messages], added) for r in records]
    return convs, f"{len(convs)} held-out conversations"


def _prompt_of(conv: list[dict]) -> list[dict]:
    """The conversation up to its last user turn: what a runtime is asked to answer."""
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    return conv[: last_user + 1]
