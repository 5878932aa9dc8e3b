"""Padding-free batches: conversations packed into rows, attention kept per conversation.

Each row holds several whole conversations back to back; ``position_ids`` restart at 0 at each one. With no
``attention_mask``, transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``) reads the restarts as
sequence boundaries and builds a block-diagonal causal mask, so no token attends across conversations. The first
label of each conversation is ``-100`` so the last token of one conversation is never trained to predict the next.

Micro-batches are sized by a token budget (``tokens_per_batch``) instead of a sequence count, so every step
does about the same work whatever the conversation lengths.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .template import IGNORE_INDEX

__all__ = ["PackedDataset", "collate_buckets", "collate_packed", "pack_rows", "plan_batches", "plan_buckets"]


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


def collate_buckets(
    examples: list[list[dict[str, list[int]]]], pad_id: int, label_index: bool = False
) -> dict[str, Any]:
    """Rows of one example each -> right-padded ``input_ids`` and ``labels``; no mask (see :func:`plan_buckets`)."""
    flat = [ex for row in examples for ex in row]
    width = max(len(ex["input_ids"]) for ex in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    labels = torch.full((len(flat), width), IGNORE_INDEX, dtype=torch.long)
    for r, ex in enumerate(flat):
        n = len(ex["input_ids"])
        ids[r, :n] = torch.tensor(ex["input_ids"])
        labels[r, :n] = torch.tensor(ex["labels"])
    out = {"input_ids": ids, "labels": labels, "num_real_tokens": sum(len(ex["input_ids"]) for ex in flat)}
    if label_index:
        out["label_index"] = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return out


def collate_packed(
    examples: list[list[dict[str, list[int]]]], pad_id: int, row_length: int | None = None, label_index: bool = False
) -> dict[str, Any]:
    """Rows of examples -> ``input_ids``, ``labels``, ``position_ids`` (no attention mask) of shape [rows, width].

    Width is the longest row, or ``row_length`` when given (fixed shapes). Padding at a row's end is its own
    "sequence" (positions restart) and is never a label, so it changes nothing that is trained. ``num_real_tokens``
    (an int) counts the conversations' tokens. With ``label_index``, also the flat positions of
    ``labels[:, 1:]`` that carry a label, computed here on the CPU so the loss needs no device sync to find them.
    """
    widths = [sum(len(ex["input_ids"]) for ex in row) for row in examples]
    width = row_length or max(widths)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    for r, row in enumerate(examples):
        at = 0
        for ex in row:
            n = min(len(ex["input_ids"]), width - at)
            if n <= 0:
                break
            ids[r, at : at + n] = torch.tensor(ex["input_ids"][:n])
            lab = torch.tensor(ex["labels"][:n])
            lab[0] = IGNORE_INDEX  # the previous conversation's last token must not predict this one's first
            labels[r, at : at + n] = lab
            pos[r, at : at + n] = torch.arange(n)
            at += n
        if at < width:
            pos[r, at:] = torch.arange(width - at)
    out = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "num_real_tokens": sum(min(w, width) for w in widths),
    }
    if label_index:
        out["label_index"] = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return out


class PackedDataset(torch.utils.data.Dataset):
    """One item = one packed micro-batch (use with ``per_device_train_batch_size=1`` and :func:`collate_packed`)."""

    def __init__(
        self, examples: list[dict], row_length: int, tokens_per_batch: int, seed: int = 0, strategy: str = "pack"
    ):
        lengths = [len(ex["input_ids"]) for ex in examples]
        if strategy == "pack":
            plan = plan_batches(lengths, row_length, tokens_per_batch, seed)
        elif strategy == "bucket":
            plan = plan_buckets(lengths, tokens_per_batch, seed)
        else:
            raise ValueError(f"packing strategy must be 'pack' or 'bucket', not {strategy!r}")
        self.batches = [[[examples[i] for i in row] for row in batch] for batch in plan]
        self.row_length, self.strategy = row_length, strategy

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[list[dict]]:
        return self.batches[i]

    def collator(self, pad_id: int, fixed_width: bool = False):
        """The Trainer's ``data_collator``: unwraps the one micro-batch the sampler hands over."""

        def collate(items: list[list[list[dict]]]) -> dict[str, Any]:
            rows = [row for item in items for row in item]
            if self.strategy == "bucket":
                batch = collate_buckets(rows, pad_id)
            else:
                batch = collate_packed(rows, pad_id, self.row_length if fixed_width else None)
            batch.pop("num_real_tokens")
            return batch

        return collate
