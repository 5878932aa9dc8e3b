"""Inference: load base (+ adapter), render prompts through the training template, generate, stream, batch.

All generation goes through :func:`generate_rows`: one ``model.generate`` call over left-padded rows that each keep
their own prompt, sampling settings (temperature, top-p/top-k, repetition penalty, seed), reply limit, LoRA adapter
(PEFT's mixed-adapter batches, ``adapter_names=``), stop tokens and strings, text callback and cancellation. A row
that finishes leaves at once (its reply is delivered), while the batch runs on for the others. :class:`Batcher`
builds such batches from requests that arrive one by one (the server); :meth:`ChatModel.generate_many` from a list
(``generate`` and ``eval``), sorted by length so that rows of one batch need little padding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..data import read_json_file
from ..errors import ConfigError, DataError, FileError
from ..files import check_output_file, temp_file
from ..model import resolve_model
from ..run import open_model, open_run
from ..settings import SamplingConfig
from ..template import encode_prompt, end_of_turn, with_system

__all__ = [
    "BASE",
    "Batcher",
    "ChatModel",
    "ReplyFile",
    "Reply",
    "Row",
    "RowCache",
    "SamplingConfig",
    "Stream",
    "generate_file",
    "generate_rows",
    "read_prompts",
]

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass
class Reply:
    """One finished reply, as ``chat``, ``generate``, ``eval`` and the server report it."""

    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop string), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Stream:
    """Iterate for text deltas; ``reply`` is set once the iteration is over."""

    _chunks: Iterator[str]
    reply: Reply | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        yield from self._chunks


# ---------------------------------------------------------------- rows and batches


@dataclass(eq=False)
class Row:
    """One reply to generate: a rendered prompt and everything that is its own within a shared batch.

    ``on_text(delta)`` gets the reply's text as it is decoded (never past a stop string, never half a character);
    ``on_done(reply)`` gets the finished reply; ``on_error(exc)`` a failure of the batch. Setting ``cancel`` ends the
    row at the next token (``finish_reason="cancelled"``). All callbacks run in the generating thread. ``cache``: a
    :class:`RowCache` carried from the row's previous call (the conversation's last turn), whose keys and values
    spare re-encoding the prompt's start; the call leaves this row's in it.
    """

    prompt_ids: list[int]
    tokenizer: Any
    stop_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    adapter: str | None = None  # PEFT adapter name; None or BASE: the base model
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Reply], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    cancel: threading.Event | None = None
    cache: RowCache | None = None
    reply: Reply | None = field(default=None, init=False)
    _tokens: list[int] = field(default_factory=list, init=False)
    _sent: int = field(default=0, init=False)  # characters of text handed to on_text

    @property
    def done(self) -> bool:
        return self.reply is not None

    def _finish(self, reason: str, text: str | None = None, eot: bool = False) -> None:
        if text is None:
            text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > self._sent:
            self.on_text(text[self._sent :])
        self._sent = len(text)
        self.reply = Reply(text, reason, len(self.prompt_ids), len(self._tokens) + eot)
        if self.on_done is not None:
            self.on_done(self.reply)

    def _cancelled(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self._finish("cancelled")
            return True
        return False

    def _step(self, token: int) -> None:
        """Take one generated token: stop, or decode and pass on the text that is certain."""
        if self._cancelled():
            return
        if token in self.stop_ids:
            self._finish("stop", eot=True)
            return
        self._tokens.append(token)
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if self.stop:
            # A stop string may have begun up to its length minus one before the last new character.
            start = max(0, self._sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self._finish("stop", text[: min(hits)])
                return
        if len(self._tokens) >= self.sampling.max_new_tokens:
            self._finish("length", text)
            return
        # Hold back a trailing half character, and what may be the start of a stop string.
        safe = len(text) - (text.endswith("\ufffd")) - (max((len(s) for s in self.stop), default=1) - 1)
        if self.on_text is not None and safe > self._sent:
            self.on_text(text[self._sent : safe])
            self._sent = safe


class _RowSampler:
    """A logits processor that samples each row with its own settings and generator.

    ``generate`` then runs greedy: a sampled row's scores come back with only its drawn token left, so argmax takes
    it. Greedy rows get the repetition penalty alone, as ``generate`` would apply it, so they stay token-exact with a
    greedy ``generate``. The penalty sees a row's own tokens only, never the left padding. OpenAI's presence and
    frequency penalties look at the reply's tokens only (as vLLM's do): ``score -= presence * (count > 0) +
    frequency * count``. A row's ``logit_bias`` is added after the penalties, before temperature, top-k and top-p
    (greedy rows get them too).
    """

    def __init__(self, rows: list[Row], width: int, device: torch.device) -> None:
        self.rows = rows
        self.pad = torch.tensor([width - len(r.prompt_ids) for r in rows], device=device)
        self.penalty = torch.tensor([[r.sampling.repetition_penalty] for r in rows], device=device)
        self.any_penalty = any(r.sampling.repetition_penalty != 1.0 for r in rows)
        self.width = width
        self.openai_penalties = [  # (row, presence, frequency) for the rows with either
            (i, r.sampling.presence_penalty, r.sampling.frequency_penalty)
            for i, r in enumerate(rows)
            if r.sampling.presence_penalty or r.sampling.frequency_penalty
        ]
        self.biases = [  # (row, token ids, biases) for the rows with a logit_bias
            (i, torch.tensor(list(b), device=device), torch.tensor(list(b.values()), device=device))
            for i, b in ((i, r.sampling.logit_bias) for i, r in enumerate(rows))
            if b
        ]
        self.generators: list[torch.Generator | None] = []
        for r in rows:
            if r.sampling.greedy:
                self.generators.append(None)
                continue
            g = torch.Generator(device=device)
            g.manual_seed(r.sampling.seed if r.sampling.seed is not None else int(torch.randint(2**62, ()).item()))
            self.generators.append(g)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if not r.sampling.greedy:
                groups.setdefault((r.sampling.temperature, r.sampling.top_k, r.sampling.top_p), []).append(i)
        self.groups = [(key, torch.tensor(idx, device=device), idx) for key, idx in groups.items()]

    def _penalize(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Padding positions point at the row's first real token: scattered twice, penalized once, as in generate.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        own = positions[None, :] >= self.pad[:, None]
        first = input_ids.gather(1, self.pad[:, None])
        ids = torch.where(own, input_ids, first)
        score = scores.gather(1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if self.any_penalty:
            scores = self._penalize(input_ids, scores)
        if self.openai_penalties and input_ids.shape[1] > self.width:
            reply = input_ids[:, self.width :]
            for i, presence, frequency in self.openai_penalties:
                counts = torch.bincount(reply[i], minlength=scores.shape[1])[: scores.shape[1]].to(scores.dtype)
                scores[i] -= frequency * counts + presence * (counts > 0).to(scores.dtype)
        if self.biases:
            for i, ids, bias in self.biases:
                scores[i, ids] += bias.to(scores.dtype)
        for (temperature, top_k, top_p), index, members in self.groups:
            sub, sub_ids = scores[index], input_ids[index]
            if temperature != 1.0:
                sub = TemperatureLogitsWarper(temperature)(sub_ids, sub)
            if top_k:
                sub = TopKLogitsWarper(top_k)(sub_ids, sub)
            if top_p < 1.0:
                sub = TopPLogitsWarper(top_p)(sub_ids, sub)
            probs = torch.softmax(sub, dim=-1)
            for j, i in enumerate(members):
                if self.rows[i].done:
                    continue
                token = torch.multinomial(probs[j], 1, generator=self.generators[i])
                scores[i] = float("-inf")
                scores[i, token] = 0.0
        return scores


class _RowStops:
    """A stopping criterion that hands each row its new token and ends the rows that are done."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                row._step(token)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _dora(model) -> set[str]:
    """The model's DoRA adapters: PEFT cannot mix them into a batch (``adapter_names=``)."""
    return {name for name, c in getattr(model, "peft_config", {}).items() if getattr(c, "use_dora", False)}


@contextlib.contextmanager
def _active(model, adapter: str):
    before = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(before)


@dataclass(eq=False)
class RowCache:
    """The keys and values one row's last call computed, kept for its next call (a conversation's next turn).

    ``ids`` are the tokens they belong to: the prompt and the reply's tokens fed back (left padding dropped). A next
    prompt that starts with some of them re-encodes only the rest; the memory held is that of one row of the call's
    own cache, at most the prompt and reply it had.
    """

    ids: list[int] = field(default_factory=list)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    reused: int = 0  # prompt tokens the last call took from the cache (not re-encoded)

    def clear(self) -> None:
        self.ids, self.layers, self.reused = [], [], 0


@functools.cache
def _cache_keyword() -> str:
    """``generate``'s name for a cache passed in: ``cache`` in later transformers 5 (``past_key_values`` warns)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _batch_cache(model, rows: list[Row], width: int):
    """A ``DynamicCache`` laid out as the left-padded batch: positions ``[0, start)`` of each row from its
    :class:`RowCache` (zeros where the row is padding, masked out); empty when nothing can be reused; None when the
    model's cache is not plain (sliding windows, linear attention: a row's cache cannot be cut and re-padded).

    ``start`` is shared by the batch: every row must encode from it on, so a row whose new tokens are fewer than
    another's re-encodes a few of its cached ones. At least the last prompt token is always encoded.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    reuse = [
        min(_common_prefix(r.cache.ids, r.prompt_ids), len(r.prompt_ids) - 1) if r.cache and r.cache.layers else 0
        for r in rows
    ]
    start = width - max(len(r.prompt_ids) - n for r, n in zip(rows, reuse, strict=True))
    # this row's tokens in [0, start): never more than it has cached, since its new tokens are at most the batch's
    takes = [max(0, start - (width - len(r.prompt_ids))) for r in rows]
    for r, take in zip(rows, takes, strict=True):
        if r.cache is not None:
            r.cache.reused = take
    if start <= 0:
        return cache
    like = next(r.cache.layers for r, take in zip(rows, takes, strict=True) if take)  # the longest row has some
    for layer in range(len(cache.layers)):
        keys, values = [], []
        for r, take in zip(rows, takes, strict=True):
            k, v = like[layer]
            zeros = k.new_zeros((1, k.shape[1], start - take, k.shape[3]))
            if take:
                k, v = r.cache.layers[layer]
                keys.append(torch.cat([zeros, k[:, :, :take]], dim=2))
                values.append(torch.cat([zeros, v[:, :, :take]], dim=2))
            else:
                keys.append(zeros)
                values.append(zeros)
        cache.update(torch.cat(keys), torch.cat(values), layer)
    for r in rows:
        if r.cache is not None:
            r.cache.layers = []  # the batch holds them now: memory for one copy, not two
    return cache


def _keep_caches(cache, rows: list[Row], sequences: torch.Tensor, width: int) -> None:
    """Cut each row's keys and values (its own tokens, no padding) out of the call's cache into its RowCache."""
    length = cache.get_seq_length()
    for i, r in enumerate(rows):
        if r.cache is None:
            continue
        pad = width - len(r.prompt_ids)
        r.cache.ids = sequences[i, pad:length].tolist()
        r.cache.layers = [
            (layer.keys[i : i + 1, :, pad:length].clone(), layer.values[i : i + 1, :, pad:length].clone())
            for layer in cache.layers
        ]


def _generate(model, rows: list[Row], pad_token_id: int, extra: dict) -> None:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
    cache = _batch_cache(model, rows, width) if any(r.cache is not None for r in rows) else None
    if cache is not None:
        extra = {**extra, _cache_keyword(): cache}
    else:
        for r in rows:  # a model whose cache cannot be cut per row encodes every prompt whole
            if r.cache is not None:
                r.cache.clear()
    sequences = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(r.sampling.max_new_tokens for r in rows),
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
        logits_processor=LogitsProcessorList([_RowSampler(rows, width, device)]),
        stopping_criteria=StoppingCriteriaList([_RowStops(rows)]),
        eos_token_id=sorted({i for r in rows for i in r.stop_ids}) or None,
        pad_token_id=pad_token_id,
        **extra,
    )
    if cache is not None:
        _keep_caches(cache, rows, sequences, width)
    for r in rows:  # generate ended early (e.g. the model's own max_length): what is there is the reply
        if not r.done:
            r._finish("length")


@torch.inference_mode()
def generate_rows(model, rows: list[Row], pad_token_id: int) -> list[Reply]:
    """Generate the rows in one left-padded ``model.generate`` call; return their replies in order.

    Rows of different LoRA adapters (and the base, ``adapter=None`` or :data:`BASE`) share the call through PEFT's
    mixed-adapter batches (``adapter_names=``); rows of a DoRA adapter, which PEFT cannot mix, get a call of their
    own with that adapter active. Each row samples, stops and streams on its own (see :class:`Row`). Cancelled rows
    are dropped before the call; a row cancelled during it stops at its next token.
    """
    live = [r for r in rows if not r.done and not r._cancelled()]
    if not _is_peft(model):
        if live:
            _generate(model, live, pad_token_id, {})
        return [r.reply for r in rows]  # type: ignore[misc]
    dora = _dora(model)
    mixed = [r for r in live if r.adapter not in dora]
    if mixed:
        _generate(model, mixed, pad_token_id, {"adapter_names": [r.adapter or BASE for r in mixed]})
    for adapter in dict.fromkeys(r.adapter for r in live if r.adapter in dora):
        with _active(model, adapter):
            _generate(model, [r for r in live if r.adapter == adapter], pad_token_id, {})
    return [r.reply for r in rows]  # type: ignore[misc]


class Batcher:
    """Dynamic batching for requests that arrive one by one (the server): a thread takes the rows waiting, up to
    ``max_batch``, and generates them together; rows that arrive meanwhile form the next batch.

    ``gate`` is held while a batch runs. ``window_s``: when fewer than ``max_batch`` rows wait, wait this long for
    more before starting (a burst of requests arrives over a few milliseconds). ``return_s``: the clients answered
    by the batch that just ended tend to send their next request at once (the next turn, the next prompt); for
    this long after a batch ends, wait for as many rows as it held. Without it a full batch splits in two for good:
    the rows that waited start alone while the returning ones, a few milliseconds late, wait a whole batch.
    """

    def __init__(
        self, model, pad_token_id: int, max_batch: int = 8, window_s: float = 0.01, return_s: float = 0.1
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model, self.pad_token_id, self.max_batch, self.window_s = model, pad_token_id, max_batch, window_s
        self.return_s = return_s
        self._ended = -math.inf  # when the last batch ended, and how many rows it held
        self._last_size = 0
        self.gate = threading.Lock()
        self.batches = 0
        self.rows_run = 0
        self.last_batch_s = 0.0
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, row: Row) -> None:
        with self._cv:
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="chatlora-batcher", daemon=True)
                self._thread.start()
            self._cv.notify()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting:
                    self._cv.wait()
            with self.gate:  # held from taking the rows to their end: a test (or a pause) can hold the model
                batch = self._pop()
                if not batch:
                    continue
                self.batches += 1  # counted as they start: their rows report back before the batch ends
                self.rows_run += len(batch)
                started = time.perf_counter()
                try:
                    generate_rows(self.model, batch, self.pad_token_id)
                except BaseException as e:  # handed to each waiting request; the batcher lives on
                    log.exception("generation failed")
                    for r in batch:
                        if not r.done and r.on_error is not None:
                            r.on_error(e)
                self.last_batch_s = time.perf_counter() - started
                with self._cv:
                    self._ended, self._last_size = time.perf_counter(), len(batch)

    def _pop(self) -> list[Row]:
        with self._cv:
            now = time.perf_counter()
            if now - self._ended < self.return_s:
                want = min(self.max_batch, len(self._waiting) + self._last_size)
                timeout = self._ended + self.return_s - now
            else:
                want, timeout = self.max_batch, self.window_s
            if len(self._waiting) < want and timeout > 0:
                self._cv.wait_for(lambda: len(self._waiting) >= want, timeout=timeout)
            n = min(self.max_batch, len(self._waiting))
            return [self._waiting.popleft() for _ in range(n)]


# ---------------------------------------------------------------- chat model


class ChatModel:
    """A base model, optionally with a LoRA adapter, that answers conversations in the training template.

    ``adapter``: the PEFT adapter this view uses (several views may share one PEFT model, as the server's do);
    default: the model's active adapter; :data:`BASE` for the base model.
    """

    def __init__(
        self, model, tokenizer, system_prompt: str | None = None, name: str = "model", adapter: str | None = None
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.name = name
        self.adapter = adapter if adapter is not None else getattr(model, "active_adapter", None)
        self.eot_token, eot_id = end_of_turn(tokenizer)
        self.stop_ids = list(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id) if i is not None))
        self.lock = threading.Lock()  # one generate() at a time on one model
        if self.device.type == "cuda":
            # cuDNN's attention builds an execution plan for every new shape, and a decode step's key length is new
            # at every token of every batch: measured slower than the flash/memory-efficient kernels (bench/NOTES.md).
            torch.backends.cuda.enable_cudnn_sdp(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        """Rows generated together by default: a GPU's decode step costs about the same for 64 rows as for one, a
        CPU's grows with the rows."""
        return 64 if self.device.type == "cuda" else 8

    @property
    def has_adapter(self) -> bool:
        return _is_peft(self.model)

    @classmethod
    def load(
        cls,
        adapter: str | Path | None = None,
        model: str | None = None,
        base_only: bool = False,
        device: str = "auto",
        system_prompt: str | None = None,
        dtype: str = "auto",
    ) -> ChatModel:
        """Load for inference: ``adapter`` (its run card names the base) or ``model`` (base or merged dir); the base
        in ``dtype`` (:func:`~chatlora.model.dtype_for`)."""
        run = open_run(adapter) if adapter is not None else open_model(model)
        net = run.load(device, dtype, base_only, model)
        tokenizer = run.tokenizer
        tokenizer.padding_side = "left"
        name = run.name if adapter is not None and not base_only else Path(resolve_model(model or run.base_spec)).name
        if system_prompt is None:
            system_prompt = run.system_prompt
        return cls(net, tokenizer, system_prompt, name)

    def conversation(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """Messages with the system prompt applied (an explicit one, the run's, or the data's own)."""
        return with_system(messages, system if system is not None else self.system_prompt)

    def prompt_ids(self, messages: list[dict], system: str | None = None) -> list[int]:
        return encode_prompt(self.conversation(messages, system), self.tokenizer)

    def row(
        self,
        prompt_ids: list[int],
        sampling: SamplingConfig | None = None,
        use_adapter: bool = True,
        **callbacks: Any,
    ) -> Row:
        """A :class:`Row` for this model (its tokenizer, stop tokens and adapter); ``callbacks``: Row's fields."""
        return Row(
            prompt_ids,
            self.tokenizer,
            self.stop_ids,
            sampling or SamplingConfig(),
            self.adapter if use_adapter else BASE,
            **callbacks,
        )

    @staticmethod
    def row_cache() -> RowCache:
        """A :class:`RowCache` for a conversation whose turns are generated one call after another (the persona
        drift): passed as ``row(..., cache=...)`` at each turn, it spares re-encoding the turns before."""
        return RowCache()

    def run(self, rows: list[Row]) -> list[Reply]:
        """Generate ``rows`` as one batch (they may come from other views of the same model)."""
        with self.lock:
            return generate_rows(self.model, rows, self.tokenizer.pad_token_id)

    def generate(
        self, messages: list[dict], sampling: SamplingConfig | None = None, system=None, use_adapter=True
    ) -> Reply:
        return self.generate_batch([messages], sampling, system, use_adapter)[0]

    def generate_batch(
        self,
        conversations: list[list[dict]],
        sampling: SamplingConfig | None = None,
        system: str | None = None,
        use_adapter: bool = True,
    ) -> list[Reply]:
        """One reply per conversation, generated together (left-padded)."""
        return self.run([self.row(self.prompt_ids(m, system), sampling, use_adapter) for m in conversations])

    def generate_many(
        self,
        conversations: Sequence[list[dict]],
        sampling: SamplingConfig | None = None,
        systems: Sequence[str | None] | None = None,
        use_adapter: bool | Sequence[bool] = True,
        batch_size: int | None = None,
        desc: str | None = "generate",
        on_reply: Callable[[int, Reply], None] | None = None,
    ) -> list[Reply]:
        """Replies to many conversations, ``batch_size`` at a time (None: :attr:`batch_size`), with a progress bar
        (``desc``; None: none).

        Batches are formed by prompt length (less padding); each conversation keeps its own system prompt
        (``systems[i]``, else the model's) and, given a sequence, its own ``use_adapter[i]`` (base and tuned rows
        then share batches). ``on_reply(i, reply)`` is called as each reply finishes. Replies come back in input
        order.
        """
        from tqdm.auto import tqdm

        if batch_size is None:
            batch_size = self.batch_size
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {batch_size}")
        systems = systems if systems is not None else [None] * len(conversations)
        adapters = [use_adapter] * len(conversations) if isinstance(use_adapter, bool) else list(use_adapter)
        if len(adapters) != len(conversations):
            raise ConfigError(f"use_adapter: {len(adapters)} values for {len(conversations)} conversations")
        prompts = [self.prompt_ids(m, s) for m, s in zip(conversations, systems, strict=True)]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        replies: list[Reply | None] = [None] * len(prompts)

        def done(i: int, reply: Reply) -> None:
            replies[i] = reply
            if on_reply is not None:
                on_reply(i, reply)
            bar.update(1)

        with tqdm(total=len(prompts), desc=desc, unit="reply", disable=desc is None) as bar:
            for start in range(0, len(order), batch_size):
                members = order[start : start + batch_size]
                rows = [self.row(prompts[i], sampling, adapters[i], on_done=partial(done, i)) for i in members]
                self.run(rows)
        return replies  # type: ignore[return-value]

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
        pieces: queue.Queue = queue.Queue()
        row = self.row(
            self.prompt_ids(messages, system),
            sampling,
            use_adapter,
            on_text=lambda text: pieces.put(("text", text)),
            cancel=stop_event,
        )

        def work() -> None:
            try:
                self.run([row])
                pieces.put(("done", None))
            except BaseException as e:  # surfaced in the consuming thread
                pieces.put(("error", e))

        stream = Stream(iter(()))

        def chunks() -> Iterator[str]:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while True:
                kind, value = pieces.get()
                if kind == "text":
                    if value:
                        yield value
                    continue
                thread.join()
                if kind == "error":
                    raise value
                stream.reply = row.reply
                return

        stream._chunks = chunks()
        return stream


def _prompt_problem(row: Any) -> tuple[list[dict] | None, str | None]:
    """The messages of one prompts-file row, or the problem with it."""
    if not isinstance(row, dict):
        return None, "expected a JSON object with 'messages' or 'prompt'"
    if "system" in row and not isinstance(row["system"], str):
        return None, "'system' must be a string"
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}], None
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "expected a 'prompt' string or a non-empty 'messages' list"
    if any(
        not isinstance(m, dict)
        or m.get("role") not in ("system", "user", "assistant")
        or not isinstance(m.get("content"), str)
        for m in messages
    ):
        return None, "each message needs a role (system/user/assistant) and string content"
    if messages[-1]["role"] != "user":
        return None, "the last message must be a user turn to reply to"
    return messages, None


def read_prompts(path: str | Path) -> list[dict]:
    """Read a prompts file: each record ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``system``.

    The file is read like a dataset (:func:`chatlora.data.read_json_file`: JSONL or a JSON array, regular files
    within the size limit, every bad line reported).

    Returns:
        ``{"row", "messages", "system", "line"}`` per prompt, in file order.

    Raises:
        DataError: Every problem found, each ``PATH:LINE: ...``.
    """
    items, problems = read_json_file(path)
    rows = []
    for line, row in items:
        messages, problem = _prompt_problem(row)
        if problem is not None:
            problems.append((line, problem))
        else:
            rows.append({"row": row, "messages": messages, "system": row.get("system"), "line": line})
    if problems:
        raise DataError.at(path, problems)
    if not rows:
        raise DataError([f"{path}: no prompts found: expected one JSON object per line"])
    return rows


class ReplyFile:
    """Where ``generate`` writes, made safe: the output is replaced whole at the end or left untouched.

    Opening checks everything that can be checked before a model is loaded: ``output`` is none of ``inputs`` (a link
    included), not a directory, and its folder takes a new file. Each reply is appended to a journal
    ``OUTPUT.<random>.partial`` next to the output, and synced, as soon as it exists; :meth:`commit` renames the
    journal over the output (or a copy in input order, when batches finished out of order). If anything fails
    before that, the journal stays with every finished reply, and the output is never touched.
    """

    def __init__(self, output: str | Path, inputs: dict[str, str | Path] | None = None) -> None:
        self.output = Path(output)
        self.target = check_output_file(output, inputs)
        self._fd, self.journal = temp_file(self.target, output)
        self._size = 0  # journal bytes that hold whole rows
        self.rows: dict[int, bytes] = {}
        self._order: list[int] = []

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def add(self, index: int, row: dict) -> None:
        """Append the output row of input row ``index`` to the journal (on disk before this returns)."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self._write(self._fd, line)
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # a cut row is not JSON; the whole ones stay readable
            raise FileError(
                f"{self.output}: cannot write the replies ({e.strerror or e}): the {len(self.rows)} finished "
                f"replies are in {self.journal}"
            ) from None
        self._size += len(line)
        self.rows[index] = line
        self._order.append(index)

    def commit(self) -> Path:
        """Rename the rows, in input order, over the output; return the output path."""
        source = self.journal
        try:
            if self._order != sorted(self._order):
                # Reorder into a second file: the journal stays whole until the output is in place.
                fd, source = temp_file(self.target, self.output)
                try:
                    self._write(fd, b"".join(self.rows[i] for i in sorted(self.rows)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(source, self.target)
        except OSError as e:
            if source != self.journal:
                source.unlink(missing_ok=True)
            raise FileError(
                f"{self.output}: cannot write the replies ({e.strerror or e}): they are in {self.journal}"
            ) from None
        os.close(self._fd)
        self._fd = -1
        self.journal.unlink(missing_ok=True)
        return self.output

    def __enter__(self) -> ReplyFile:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        if not self.rows:
            self.journal.unlink(missing_ok=True)
        elif not isinstance(error, FileError):  # a FileError already says where the replies are
            log.warning("stopped after %d replies; the finished ones are in %s", len(self.rows), self.journal)


def generate_file(
    chat: ChatModel,
    prompts: list[dict],
    out: ReplyFile,
    sampling: SamplingConfig | None = None,
    batch_size: int | None = None,
    system: str | None = None,
) -> Path:
    """Answer ``prompts`` (from :func:`read_prompts`) in batches and write each input row plus its reply to ``out``.

    Each prompt keeps its own system prompt (a row's own, else ``system``, else the model's) within a shared batch;
    batches are formed by prompt length (:meth:`ChatModel.generate_many`). Rows go to ``out`` as their batch
    finishes and end up in input order when ``out`` is committed.
    """

    def write(i: int, reply: Reply) -> None:
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        out.add(i, {**prompts[i]["row"], "reply": reply.text, "finish_reason": reply.finish_reason, "usage": usage})

    chat.generate_many(
        [p["messages"] for p in prompts],
        sampling,
        systems=[p["system"] if p["system"] is not None else system for p in prompts],
        batch_size=batch_size,
        on_reply=write,
    )
    return out.commit()
