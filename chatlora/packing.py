"""Padding-free batches: conversations packed into rows, attention kept per conversation.

Each row holds several whole conversations back to back; ``position_ids`` restart at 0 at each one. With no
``attention_mask``, transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``) reads the restarts as
sequence boundaries and builds a block-diagonal causal mask, so no token attends across conversations. The first
label of each conversation is ``-100`` so the last token of one conversation is never trained to predict the next.

Micro-batches are either a fixed number per epoch (:func:`plan_steps`: as many optimizer steps per epoch as the
unpacked recipe, so batch size, epochs and learning-rate schedule keep their meaning) or sized by a token budget
(:func:`plan_batches`, ``tokens_per_batch``); either way every step does about the same work whatever the
conversation lengths. Every batch chatlora feeds a model, packed or not, is built by :func:`collate`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .template import IGNORE_INDEX

__all__ = [
    "LAYOUTS",
    "PackedDataset",
    "collate",
    "pack_rows",
    "plan_batches",
    "plan_buckets",
    "plan_steps",
]

Example = dict[str, list[int]]  # one encoded conversation: input_ids and labels
LAYOUTS = ("pad", "bucket", "pack")  # how collate lays out a batch's rows


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most ``row_length`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], row_length)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_length - n)
    return rows


def plan_batches(lengths: list[int], row_length: int, tokens_per_batch: int, seed: int = 0) -> list[list[list[int]]]:
    """Micro-batches of packed rows: each a list of rows (lists of example indices), ``tokens_per_batch // row_length``
    rows at most. Rows are shuffled with ``seed`` so a micro-batch mixes long and short conversations."""
    rows = pack_rows(lengths, row_length)
    random.Random(seed).shuffle(rows)
    per_batch = max(1, tokens_per_batch // row_length)
    return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]


def plan_steps(lengths: list[int], row_length: int, n_batches: int, seed: int = 0) -> list[list[list[int]]]:
    """Exactly ``n_batches`` micro-batches of packed rows (fewer only with fewer conversations than that).

    Rows are packed over the whole dataset (first-fit decreasing, nearly full), shuffled with ``seed`` and spread
    as evenly as possible (row counts differ by at most one). When there are fewer rows than micro-batches (short
    conversations, small batches), the conversations are shuffled into ``n_batches`` groups of near-equal count
    first, and each group is packed into its own rows.

    With ``n_batches = ceil(conversations / (batch_size x grad_accum)) x grad_accum``, an epoch has as many optimizer
    steps as without packing and each step holds, on average, the tokens of batch_size x grad_accum conversations.
    """
    rng = random.Random(seed)
    rows = pack_rows(lengths, row_length)
    n = max(1, min(n_batches, len(lengths)))
    if len(rows) < n:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        return [
            [[group[i] for i in row] for row in pack_rows([lengths[i] for i in group], row_length)]
            for group in _spread(order, n)
        ]
    rng.shuffle(rows)
    return _spread(rows, n)


def _spread(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), n)
    out, at = [], 0
    for b in range(n):
        take = size + (b < extra)
        out.append(items[at : at + take])
        at += take
    return out


def plan_buckets(lengths: list[int], tokens_per_batch: int, seed: int = 0) -> list[list[list[int]]]:
    """Micro-batches of conversations of near-equal length, one per row, ``rows x longest <= tokens_per_batch``.

    The alternative to packing: rows are right-padded (little padding, as neighbours in length order are alike)
    and need no attention mask at all, because with right padding a causal mask alone keeps every real token
    from seeing padding, so attention runs on the fused causal kernels (flash, native GQA).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[list[int]]] = []
    group: list[int] = []
    for i in order:
        if group and (len(group) + 1) * lengths[i] > tokens_per_batch:
            batches.append([[j] for j in group])
            group = []
        group.append(i)
    if group:
        batches.append([[j] for j in group])
    random.Random(seed).shuffle(batches)
    return batches


def collate(
    batch: Sequence[Example | Sequence[Example]],
    pad_id: int,
    layout: str = "pad",
    row_length: int | None = None,
    label_index: bool = False,
) -> dict[str, Any]:
    """Encoded examples -> one model batch; the one collator of training (padded, bucketed, packed) and eval.

    Each item of ``batch`` is a row: one example, or (``"pack"``) a list of examples laid back to back. Rows are
    right-padded with ``pad_id`` to the longest row, or to ``row_length`` (fixed shapes); padding is never a label.

    Layouts:
        ``"pad"``: one example per row and an ``attention_mask`` over its tokens (unpacked training, held-out loss).
        ``"bucket"``: one example per row and no mask: with right padding the causal mask alone keeps every real
            token from seeing padding, so attention runs on the fused causal kernels (see :func:`plan_buckets`).
        ``"pack"``: ``position_ids`` restart at 0 at each example and there is no mask; transformers reads the
            restarts as sequence boundaries. Each example's first label is -100 (the previous conversation's last
            token must not predict it); padding at a row's end is its own "sequence".

    ``"bucket"`` and ``"pack"`` also give ``num_real_tokens`` (an int: the examples' tokens, counted on the CPU)
    and, with ``label_index``, the flat positions of ``labels[:, 1:]`` that carry a label, computed here so the loss
    needs no device sync to find them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    rows = [[item] if isinstance(item, dict) else list(item) for item in batch]
    if layout != "pack" and any(len(row) != 1 for row in rows):
        raise ValueError(f"the {layout!r} layout takes one example per row")
    widths = [sum(len(ex["input_ids"]) for ex in row) for row in rows]
    width = row_length or max(widths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long) if layout == "pack" else None
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = min(len(ex["input_ids"]), width - at)
            if n <= 0:
                break
            ids[r, at : at + n] = torch.tensor(ex["input_ids"][:n])
            lab = torch.tensor(ex["labels"][:n])
            if pos is not None:
                lab[0] = IGNORE_INDEX
                pos[r, at : at + n] = torch.arange(n)
            labels[r, at : at + n] = lab
            at += n
        if pos is not None and at < width:
            pos[r, at:] = torch.arange(width - at)
    out: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if layout == "pad":
        lengths = torch.tensor([min(w, width) for w in widths])
        out["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
        return out
    if pos is not None:
        out["position_ids"] = pos
    out["num_real_tokens"] = sum(min(w, width) for w in widths)
    if label_index:
        out["label_index"] = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return out


class PackedDataset(torch.utils.data.Dataset):
    """One item = one micro-batch of rows (use with ``per_device_train_batch_size=1`` and :func:`collate`).

    Give either ``n_batches`` (micro-batches per epoch, :func:`plan_steps`) or ``tokens_per_batch`` (a token budget
    per micro-batch, :func:`plan_batches`; the only choice for the ``bucket`` strategy).
    """

    def __init__(
        self,
        examples: list[dict],
        row_length: int,
        tokens_per_batch: int | None = None,
        seed: int = 0,
        strategy: str = "pack",
        n_batches: int | None = None,
    ):
        lengths = [len(ex["input_ids"]) for ex in examples]
        if strategy not in ("pack", "bucket"):
            raise ValueError(f"packing strategy must be 'pack' or 'bucket', not {strategy!r}")
        if (tokens_per_batch is None) == (n_batches is None):
            raise ValueError("give exactly one of tokens_per_batch and n_batches")
        if strategy == "bucket":
            if tokens_per_batch is None:
                raise ValueError("the bucket strategy needs tokens_per_batch")
            plan = plan_buckets(lengths, tokens_per_batch, seed)
        elif n_batches is not None:
            plan = plan_steps(lengths, row_length, n_batches, seed)
        else:
            plan = plan_batches(lengths, row_length, tokens_per_batch, seed)
        self.plan = plan
        self.batches = [[[examples[i] for i in row] for row in batch] for batch in plan]
        self.row_length, self.strategy = row_length, strategy

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[list[dict]]:
        return self.batches[i]
