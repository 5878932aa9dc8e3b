"""Preference tuning on TRL's trainers: DPO, ORPO, SimPO (TRL's CPO trainer with its SimPO loss) and KTO.

A preference run is an SFT run with another loss, and keeps what SFT runs have: pairs read and validated up front
(:mod:`chatlora.preference`), encoded by chatlora's chat template (TRL gets token ids, so text is never parsed for
control tokens, and each side is the reply plus its end-of-turn token, the tokens SFT labels), a seeded held-out
split, the plan and memory estimate, the run card, checkpoints marked complete, resume, refusal to overwrite,
``--dry-run`` and QLoRA. ``--from-adapter`` starts from a trained adapter (the SFT run).

The reference DPO and KTO measure against is never a second model: with a fresh LoRA it is the base (the adapter
disabled), with ``--from-adapter`` the starting adapter, kept by TRL as a second, frozen adapter of the same
model. ORPO and SimPO have no reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import DEFAULT_BETA, TrainConfig
from ..errors import ConfigError, DataError
from ..model import load_tokenizer
from ..preference import EncodedPairs, encode_pairs, load_pairs, parse_pair_columns
from ..runcard import read_run_card
from ..template import IGNORE_INDEX
from .plan import make_plan
from .train import (
    PreparedRun,
    SafeRunMixin,
    TrainResult,
    _BuiltTrainer,
    _world,
    _write_outputs,
    check_launch,
    fit,
    model_and_output,
    placement,
    run_logger,
    sample_callbacks,
    split_records,
    system_prompts,
    training_args,
)

__all__ = ["PreparedPreference", "prepare_preference", "require_trl", "train_preference"]

log = logging.getLogger(__name__)

# method -> (module, trainer, config) in TRL
TRAINERS = {
    "dpo": ("trl", "DPOTrainer", "DPOConfig"),
    "kto": ("trl", "KTOTrainer", "KTOConfig"),
    "orpo": ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "simpo": ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
}
WITH_REFERENCE = ("dpo", "kto")
SIMPO_GAMMA_RATIO = 0.5  # SimPO's target margin over beta (the paper's and TRL's default)


def require_trl(method: str) -> None:
    """Refuse a preference method without TRL installed, before anything is read or loaded."""
    if importlib.util.find_spec("trl") is None:
        raise ConfigError(
            f"`--method {method}` trains on TRL's trainers, which are not installed: pip install 'chatlora[pref]'"
        )


@dataclass
class PreparedPreference(PreparedRun):
    """Everything decided before any weights load, as for SFT: ``records`` are the pairs, the examples their
    encodings (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""

    @property
    def beta(self) -> float:
        return self.cfg.beta if self.cfg.beta is not None else DEFAULT_BETA[self.cfg.method]

    def reference(self) -> str:
        if self.cfg.method not in WITH_REFERENCE:
            return "none (the loss needs no reference model)"
        what = f"the starting adapter {self.cfg.from_adapter}" if self.cfg.from_adapter else "the base"
        return (
            f"{what}, as a frozen adapter state of the same model (no second copy): one more forward pass per step, "
            "without gradients"
        )

    def lines(self) -> list[str]:
        s = self.split
        what = "preference pairs" if self.records[0].paired else "unpaired completions"
        return [
            f"data: {self.cfg.data}: {len(self.records)} {what} -> {len(s.train)} train, {len(s.val)} held out "
            f"({s.rule})"
            + (f", {s.dropped_duplicates} training copies of held-out pairs dropped" if s.dropped_duplicates else ""),
            f"method: {self.cfg.method} (beta {self.beta:g}{self._sft_note()}) on TRL; reference: {self.reference()}",
            self.system.line(),
            *self.plan.lines(),
        ]

    def _sft_note(self) -> str:
        return f", plus {self.cfg.sft_weight:g} x SFT loss on the chosen replies" if self.cfg.sft_weight else ""

    def card_sections(self) -> dict[str, Any]:
        return {
            "preference": {
                "method": self.cfg.method,
                "beta": self.beta,
                "sft_weight": self.cfg.sft_weight,
                "reference": self.reference(),
                "from_adapter": str(Path(self.cfg.from_adapter).resolve()) if self.cfg.from_adapter else None,
                "trl": importlib.import_module("trl").__version__,
                "train_pairs": len(self.split.train),
                "val_pairs": len(self.split.val),
            }
        }


def _plan_sequences(encoded: EncodedPairs) -> list[dict]:
    """Each pair as the two sequences a step runs (prompt + chosen, prompt + rejected), for the plan's batches."""
    out = []
    for ex in encoded.examples:
        for side in ("chosen_ids", "rejected_ids"):
            if side not in ex:  # an unpaired completion
                continue
            prompt = ex["prompt_ids"]
            out.append({"input_ids": prompt + ex[side], "labels": [IGNORE_INDEX] * len(prompt) + ex[side]})
    return out


def _check_start_adapter(cfg: TrainConfig, model_path: str) -> None:
    """``--from-adapter`` must have been trained on this base: its LoRA weights mean nothing on another."""
    if not cfg.from_adapter:
        return
    base = read_run_card(cfg.from_adapter).get("base_model", {})
    if base.get("resolved") not in (None, model_path) and base.get("spec") != cfg.model:
        raise ConfigError(
            f"`--from-adapter` {cfg.from_adapter} was trained on {base.get('spec')} ({base.get('resolved')}), not on "
            f"--model {cfg.model}: pass --model {base.get('spec')}"
        )


def prepare_preference(cfg: TrainConfig) -> PreparedPreference:
    """Read, split and encode the pairs and plan the run, without weights (the dry run prints this)."""
    require_trl(cfg.method)
    check_launch(cfg, _world()[0])
    pairs = load_pairs(cfg.data, cfg.format if cfg.format != "messages" else "trl", parse_pair_columns(cfg.columns))
    if cfg.method != "kto" and not pairs[0].paired:
        raise DataError(
            [
                f"{cfg.data}:{pairs[0].line}: an unpaired completion (prompt, completion, label): `--method "
                f"{cfg.method}` needs pairs (prompt, chosen, rejected); only --method kto trains on unpaired data"
            ]
        )
    split = split_records(pairs, cfg.val_size, cfg.split_seed, cfg.allow_small_train)
    world_size, device, precision, model_path, shape = placement(cfg)
    _check_start_adapter(cfg, model_path)
    tokenizer = load_tokenizer(model_path)
    system = system_prompts(cfg, pairs)
    train_enc = encode_pairs(split.train, tokenizer, system.added, cfg.max_length, cfg.data)
    val_enc = encode_pairs(split.val, tokenizer, system.added, cfg.max_length, cfg.data)
    if train_enc.truncated or val_enc.truncated:
        log.warning(
            "%d training and %d held-out pairs were longer than max_length=%d: their replies were cut",
            train_enc.truncated,
            val_enc.truncated,
            cfg.max_length,
        )
    if not train_enc.examples:
        raise DataError(
            [f"{cfg.data}: no training pair's prompt leaves room for a reply within max_length={cfg.max_length}"]
        )
    # TRL pads each pair's two sequences into one batch (no packing); its fused LM head is planned as the full one
    plan_cfg = replace(
        cfg,
        packing=False,
        compile=False,
        liger=False,
        logits_at_labels=False,
        batch_size=cfg.batch_size * (1 if cfg.method == "kto" else 2),
    )
    plan = make_plan(plan_cfg, device, precision, shape, _plan_sequences(train_enc), world_size)
    return PreparedPreference(
        cfg=cfg,
        records=pairs,
        split=split,
        device=device,
        precision=precision,
        model_path=model_path,
        tokenizer=tokenizer,
        train_ex=train_enc.examples,
        val_ex=val_enc.examples,
        truncated={"train": train_enc.truncated, "val": val_enc.truncated, "max_length": cfg.max_length},
        dropped={"train": len(train_enc.dropped), "val": len(val_enc.dropped)},
        plan=plan,
        system=system,
    )


# ---------------------------------------------------------------------------------------------------------------------
# TRL's trainers on chatlora's encodings


def _unpaired(examples: list[dict], seed: int) -> list[dict]:
    """KTO's rows: each pair's chosen side desirable, its rejected side undesirable (an unpaired completion: its one
    side, as labelled), shuffled once with ``seed`` (KTO reads its batches in order: its KL estimate pairs each row
    with its batch neighbour's completion)."""
    rows = [
        {"prompt_ids": ex["prompt_ids"], "completion_ids": ex[f"{side}_ids"], "label": side == "chosen"}
        for ex in examples
        for side in ("chosen", "rejected")
        if f"{side}_ids" in ex
    ]
    random.Random(seed).shuffle(rows)
    return rows


def _cpo_rows(examples: list[dict]) -> list[dict]:
    """ORPO's and CPO's (SimPO's) tokenized rows: each side whole, its prompt labelled -100."""
    rows = []
    for ex in examples:
        prompt = ex["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + ex[f"{side}_ids"]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + ex[f"{side}_ids"]
        rows.append(row)
    return rows


def _rows(method: str, examples: list[dict], seed: int) -> list[dict]:
    if method == "kto":
        return _unpaired(examples, seed)
    if method in ("orpo", "simpo"):
        return _cpo_rows(examples)
    return examples


def _trainer_class(method: str):
    module, trainer_name, _ = TRAINERS[method]
    base = getattr(importlib.import_module(module), trainer_name)

    class PreferenceTrainer(SafeRunMixin, base):
        """TRL's trainer fed chatlora's token ids: its own tokenization (which would parse text for control tokens)
        is skipped, what it derives from the ids (KTO's mismatched KL completions) is kept."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # DPO, KTO
            if getattr(self, "calculate_KL", False):

                def add_kl_completions(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                dataset = dataset.map(add_kl_completions, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature, model=None):  # ORPO, CPO: the rows are already tokenized
            return feature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.include_num_input_tokens_seen == "no" and model.training:  # ORPO, CPO: no "input_ids"
                masks = [inputs[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs]
                self.state.num_input_tokens_seen += int(sum(m.sum() for m in masks))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return PreferenceTrainer


def _method_args(run: PreparedPreference) -> dict[str, Any]:
    """The TRL config's own fields for this run."""
    cfg = run.cfg
    extra: dict[str, Any] = {"beta": run.beta, "max_length": cfg.max_length, "disable_dropout": cfg.lora_dropout == 0}
    if cfg.method == "simpo":
        extra.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=SIMPO_GAMMA_RATIO * run.beta)
    if cfg.method in ("orpo", "simpo"):
        extra["max_completion_length"] = cfg.max_length
    if cfg.method in ("dpo", "kto"):
        extra["dataset_num_proc"] = None
    if cfg.method == "dpo" and cfg.sft_weight:
        extra.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.sft_weight])
    return extra


def _build_trainer(cfg: TrainConfig, run: PreparedPreference, checkpoint: str | None, callbacks) -> _BuiltTrainer:
    """The model with its adapter (fresh or ``--from-adapter``), metrics.jsonl and TRL's trainer around both."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()  # the rows are already encoded: TRL's map passes are instant
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # TRL's
    model, params, metrics_path = model_and_output(cfg, run, checkpoint)
    config_class = getattr(importlib.import_module(TRAINERS[cfg.method][0]), TRAINERS[cfg.method][2])
    # TRL's rows have no "input_ids" to group by length: batches are drawn at random (KTO's in order)
    unsorted = replace(cfg, group_by_length=False)
    args = training_args(
        unsorted, run.precision, run.device, bool(run.val_ex), run.plan, config_class, **_method_args(run)
    )
    if cfg.method == "kto":
        args.train_sampling_strategy = "sequential"  # the rows are shuffled once, with --data-seed (_unpaired)
    if cfg.method in ("orpo", "simpo"):
        args.include_num_input_tokens_seen = "no"  # counted by PreferenceTrainer.compute_loss
    logger = run_logger(args, metrics_path, checkpoint, run.plan)
    samples = sample_callbacks(cfg, run, metrics_path.parent, args.world_size)
    trainer_class = _trainer_class(cfg.method)
    trainer_class.keep_checkpoints = cfg.save_total_limit
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(_rows(cfg.method, run.train_ex, cfg.order_seed)),
        eval_dataset=datasets.Dataset.from_list(_rows(cfg.method, run.val_ex, cfg.order_seed)) if run.val_ex else None,
        processing_class=run.tokenizer,
        callbacks=[logger, *samples, *callbacks],
    )
    if cfg.method in WITH_REFERENCE and not cfg.from_adapter and "ref" in trainer.model.peft_config:
        # TRL copied the fresh adapter as the reference; a fresh adapter is the base, which disabling it gives
        trainer.model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)
    return _BuiltTrainer(trainer, args, logger, metrics_path, params)


def train_preference(cfg: TrainConfig, callbacks=()) -> TrainResult:
    """One preference run end to end: plan (:func:`prepare_preference`), claim the output dir, build TRL's trainer,
    train, write the adapter and the run card (with a ``preference`` section)."""
    run = prepare_preference(cfg)
    built, ended, eval_loss = fit(cfg, run, _build_trainer, callbacks)
    model = built.trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # the reference copy is not part of the result
    return _write_outputs(cfg, run, built, ended, eval_loss, run.card_sections())
