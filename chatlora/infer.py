"""Inference: load base (+ adapter), render prompts through the training template, generate, stream, batch."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import base_quantization, load_model, load_tokenizer, pick_device, resolve_model
from .template import encode_prompt, end_of_turn, with_system

__all__ = ["ChatModel", "Reply", "SamplingConfig", "Stream", "read_prompts"]


@dataclass
class SamplingConfig:
    """Decoding settings. ``temperature <= 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Stream:
    """Iterate for text deltas; ``reply`` is set once the iteration is over."""

    _chunks: Iterator[str]
    reply: Reply | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        yield from self._chunks


def _dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class ChatModel:
    """A base model, optionally with a LoRA adapter, that answers conversations in the training template."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.name = name
        self.eot_token, eot_id = end_of_turn(tokenizer)
        self.stop_ids = list(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id) if i is not None))
        self.lock = threading.Lock()  # one generate() at a time on one model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @classmethod
    def load(
        cls,
        adapter: str | Path | None = None,
        model: str | None = None,
        base_only: bool = False,
        device: str = "auto",
        system_prompt: str | None = None,
    ) -> ChatModel:
        """Load for inference: ``adapter`` (its run card names the base) or ``model`` (base or merged dir)."""
        from .train import read_adapter, read_run_card

        dev = pick_device(device)
        card: dict = {}
        if adapter is not None:
            adapter = Path(adapter)
            card, spec = read_adapter(adapter)
            model = model if model is not None else spec
        else:
            card = read_run_card(model) if model and Path(model).is_dir() else {}
        base_path = resolve_model(model)
        # The adapter dir carries the exact tokenizer + chat template used in training.
        tokenizer = load_tokenizer(str(adapter) if adapter is not None else base_path)
        tokenizer.padding_side = "left"
        quantize = base_quantization([card], dev) if adapter is not None else None
        net = load_model(base_path, _dtype_for(dev), dev, quantize=quantize)
        name = Path(base_path).name
        if adapter is not None and not base_only:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(adapter))
            name = adapter.name
        if system_prompt is None:
            system_prompt = card.get("template", {}).get("system_prompt")
        return cls(net, tokenizer, system_prompt, name)

    def conversation(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """Messages with the system prompt applied (an explicit one, the run's, or the data's own)."""
        return with_system(messages, system if system is not None else self.system_prompt)

    def prompt_ids(self, messages: list[dict], system: str | None = None) -> list[int]:
        return encode_prompt(self.conversation(messages, system), self.tokenizer)

    def _adapter(self, use_adapter: bool):
        if self.has_adapter and not use_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _finish(self, new_ids: list[int], prompt_len: int) -> Reply:
        stop = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), None)
        kept = new_ids if stop is None else new_ids[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Reply(text, "length" if stop is None else "stop", prompt_len, len(kept) + (stop is not None))

    def _generate_ids(self, batch_ids: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        width = max(len(ids) for ids in batch_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=self.device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            **sampling.generate_kwargs(),
        )
        return [row[width:].tolist() for row in out]

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], sampling: SamplingConfig | None = None, system=None, use_adapter=True
    ) -> Reply:
        return self.generate_batch([messages], sampling, system, use_adapter)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        conversations: list[list[dict]],
        sampling: SamplingConfig | None = None,
        system: str | None = None,
        use_adapter: bool = True,
    ) -> list[Reply]:
        """One reply per conversation, generated together (left-padded)."""
        sampling = sampling or SamplingConfig()
        prompts = [self.prompt_ids(m, system) for m in conversations]
        with self.lock, self._adapter(use_adapter):
            outs = self._generate_ids(prompts, sampling)
        return [self._finish(new, len(p)) for new, p in zip(outs, prompts, strict=True)]

    def stream(
        self,
        messages: list[dict],
        sampling: SamplingConfig | None = None,
        system=None,
        use_adapter=True,
        stop_event: threading.Event | None = None,
    ) -> Stream:
        """Generate in a background thread and yield text as it is decoded.

        Setting ``stop_event`` ends the generation at the next token (e.g. when a server's client disconnects).
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        sampling = sampling or SamplingConfig()
        prompt = self.prompt_ids(messages, system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work() -> None:
            with torch.inference_mode(), self.lock, self._adapter(use_adapter):
                try:
                    ids = torch.tensor([prompt], device=self.device)
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_EventStop(stop_event)]) if stop_event else None,
                        **sampling.generate_kwargs(),
                    )
                    result["ids"] = out[0][len(prompt) :].tolist()
                except BaseException as e:  # surfaced in the consuming thread
                    result["error"] = e
                    streamer.end()

        class _EventStop(StoppingCriteria):
            def __init__(self, event: threading.Event):
                self.event = event

            def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
                return torch.full(
                    (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
                )

        thread = threading.Thread(target=work, daemon=True)
        stream = Stream(iter(()))

        def chunks() -> Iterator[str]:
            thread.start()
            yield from (text for text in streamer if text)
            thread.join()
            if "error" in result:
                raise result["error"]
            stream.reply = self._finish(result["ids"], len(prompt))

        stream._chunks = chunks()
        return stream


def read_prompts(path: str | Path) -> list[dict]:
    """Read a prompts JSONL: each line ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``system``."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}): expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'messages' or 'prompt'")
        if isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            bad = [
                m
                for m in messages
                if not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ]
            if bad:
                raise ValueError(f"{path}:{n}: each message needs a role (system/user/assistant) and string content")
            if messages[-1]["role"] != "user":
                raise ValueError(f"{path}:{n}: the last message must be a user turn to reply to")
        else:
            raise ValueError(f"{path}:{n}: expected a 'prompt' string or a non-empty 'messages' list")
        if "system" in row and not isinstance(row["system"], str):
            raise ValueError(f"{path}:{n}: 'system' must be a string")
        rows.append({"row": row, "messages": messages, "system": row.get("system"), "line": n})
    if not rows:
        raise ValueError(f"{path}: no prompts found: expected one JSON object per line")
    return rows
