"""Command line: parses flags and calls the library. No logic lives here.

One idea over 600 lines: the parsers of every command (their flags, help and the call each makes); defaults and help
of the shared settings come from the config dataclasses, the behaviour from the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .config import TrainConfig, data_system_prompt, field_type, load_config
from .errors import ChatloraError, CliError

EXIT_USAGE = 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # NVLink multicast (NVLS) stays off in NCCL: it can take a shared host's GPUs out of service.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # packed micro-batches vary in shape; expandable segments keep the CUDA caching allocator from fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("transformers", "peft", "accelerate", "torch", "httpx", "urllib3", "gguf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


# ---------------------------------------------------------------- flags


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field becomes a flag (``lora_r`` -> ``--lora-r``); flags win over ``--config``."""
    p.add_argument("--config", help="YAML file whose keys are the flags below (flags win)")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("yaml_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "auto" if default is None and kind is bool else default
        help_ = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse %-formats help
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", default=None, metavar="DIR", help=help_)
        elif f.name == "data":  # repeated: several sources mixed (--data-weights)
            p.add_argument(flag, action="append", default=None, help=help_ + "; repeat it to mix several sources")
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif kind is list:
            p.add_argument(flag, default=None, metavar="A,B", help=help_)
        else:
            p.add_argument(flag, type=kind, default=None, help=help_)


def _config_from(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if not f.metadata.get("yaml_only")
    }
    data = overrides.pop("data") or []
    if len(data) > 1:
        overrides["datasets"] = [{"path": path} for path in data]
    elif data:
        overrides["data"] = data[0]
    return load_config(args.config, overrides)


def _add_setting(p, cls: type, name: str, flag: str | None = None, shown=None, **kw) -> None:
    """``--name`` (or ``flag``) for field ``name`` of the settings dataclass ``cls``: its default and help come from
    the field (``shown``: the default as the help states it, where the flag's unit differs)."""
    from .settings import setting_default, setting_help

    default = kw.pop("default", setting_default(cls, name))
    help_ = setting_help(cls, name)
    if kw.get("action") != "store_true":
        kw.setdefault("default", default)
        if default is not None or shown is not None:
            help_ += f" (default: {default if shown is None else shown})"
    p.add_argument(flag or "--" + name.replace("_", "-"), dest=name, help=help_.replace("%", "%%"), **kw)


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    from .settings import SamplingConfig

    for name, kind in [("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float)]:
        _add_setting(p, SamplingConfig, name, type=kind)
    _add_setting(p, SamplingConfig, "presence_penalty", type=float)
    _add_setting(p, SamplingConfig, "frequency_penalty", type=float)
    extra = {} if max_new_tokens is None else {"default": max_new_tokens}
    _add_setting(p, SamplingConfig, "max_new_tokens", type=int, **extra)
    _add_setting(p, SamplingConfig, "seed", type=int)


def _sampling(args: argparse.Namespace):
    from .settings import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )
    problems = sampling.problems()  # the ranges the server checks too
    if problems:
        name, why = problems[0]
        raise CliError(f"--{name.replace('_', '-')} {why}, got {getattr(sampling, name)}")
    return sampling


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, alike for chat/generate, eval and serve."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        help="the base model's dtype: auto (bf16 on GPUs and CPUs that have it, else fp16 on a GPU / fp32), fp32, bf16, fp16",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="a chatlora output dir (adapter + run card)")
    p.add_argument(
        "--model", help="base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapter's base"
    )
    p.add_argument("--base-only", action="store_true", help="ignore the adapter: talk to the base model")
    p.add_argument("--system", default=None, help="system prompt (default: the one the adapter was trained with)")
    p.add_argument(
        "--character",
        default=None,
        metavar="CARD",
        help="Character Card V2 (JSON or PNG) compiled into the system prompt, as train does (default: the adapter's own)",
    )
    _add_device_flags(p)


def _load_chat(args: argparse.Namespace):
    from .inference.infer import ChatModel

    if not args.adapter and not args.model:
        raise CliError("give --adapter DIR (a trained run) or --model M (a base or merged model)")
    system_prompt = None
    if args.character is not None:
        from .character import load_card

        if args.system is not None:
            raise CliError("--character and --system both set the system prompt: give one of them")
        system_prompt = load_card(args.character).prompt
    return ChatModel.load(
        args.adapter, args.model, args.base_only, args.device, system_prompt=system_prompt, dtype=args.dtype
    )


# ---------------------------------------------------------------- commands


def cmd_data_check(args: argparse.Namespace) -> int:
    if args.preference:
        return _check_pairs(args)
    from .show import check_data

    model = None if args.no_tokenize else args.model
    stats, warnings = check_data(args.path, args.format, args.columns, model, args.system_prompt, args.max_length)
    if args.json:
        print(json.dumps({**stats, "warnings": warnings}, ensure_ascii=False, indent=2))
        return 0
    for line in warnings:
        print(line)
    print(f"{args.path}: OK" + (f" ({len(warnings)} warning{'s' * (len(warnings) > 1)})" if warnings else ""))
    for key, value in stats.items():
        if isinstance(value, dict):
            print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"  {key}: {value}")
    return 0


def _check_pairs(args: argparse.Namespace) -> int:
    from .preference import describe_pairs, load_pairs, parse_pair_columns

    pairs = load_pairs(args.path, args.format, parse_pair_columns(args.columns))
    tokenizer = None
    if not args.no_tokenize:
        from .model import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
    stats = describe_pairs(pairs, tokenizer, data_system_prompt(args.path, args.system_prompt), args.max_length)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    what = "preference pairs" if "pairs" in stats else "unpaired completions, KTO's data"
    print(f"{args.path}: OK ({len(pairs)} {what})")
    for key, value in stats.items():
        print(
            f"  {key}: " + (", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
        )
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from .show import format_record, legend, show_records

    keys = ("model", "system_prompt", "character", "format", "columns", "max_length", "train_on_user")
    cfg = load_config(args.config, {"data": args.path, **{k: getattr(args, k) for k in keys}})
    shown = show_records(cfg, args.n)
    if args.json:
        for record in shown:
            print(json.dumps(record.as_json(), ensure_ascii=False))
        return 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(legend(color))
    for record in shown:
        print()
        print(format_record(record, cfg.data, color))
    return 0


def _print_paths(out: Path, card: dict) -> None:
    from .runcard import LOSS_PLOT, METRICS, RUN_CARD

    res = card.get("results", {})
    print(f"adapter:     {out}  (PEFT format; run card {out / RUN_CARD})")
    print(f"metrics:     {out / METRICS}")
    if (out / LOSS_PLOT).exists():
        print(f"loss plot:   {out / LOSS_PLOT}")
    loss = res.get("train_loss_final")
    ev = res.get("eval_loss")
    hw = card["hardware"]
    recent = res.get("tokens_per_second_recent")  # None when no train loss was logged (a resume at the last step)
    parts = [
        f"steps {res.get('global_step')}, final train loss {loss:.4f}"
        if loss is not None
        else f"steps {res.get('global_step')}, no train loss logged",
        f"held-out loss {ev:.4f}" if ev is not None else None,
        (f"{recent} tokens/s at the end, " if recent is not None else "tokens/s: ")
        + f"{res.get('tokens_per_second_average')} on average (warm-up included) on {hw['device']} "
        f"({hw['precision']})",
    ]
    print(" | ".join(p for p in parts if p))
    if hw.get("peak_gpu_memory_gib") is not None:
        print(
            f"GPU memory:  peak {hw['peak_gpu_memory_gib']} GiB (estimated before the run: {hw['estimated_peak_gib']})"
        )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from(args)
    if cfg.method == "sft":
        from .training.train import prepare_run, train
    else:
        from .training.align import prepare_preference as prepare_run
        from .training.align import train_preference as train
    if args.dry_run:
        run = prepare_run(cfg)
        print("\n".join(run.lines()))
        print("dry run: no weights loaded, nothing written")
        return 0
    result = train(cfg)
    if result.run_card:
        _print_paths(result.output_dir, result.run_card)
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from .config import PersonaConfig
    from .data import load_records, parse_columns
    from .eval.persona import resolve
    from .pairs import build_pairs, held_out_indices

    sampling = _sampling(args)
    if args.batch_size is not None and args.batch_size <= 0:
        raise CliError("--batch-size must be > 0")
    records = load_records(args.data, args.format, parse_columns(args.columns))
    if args.max_records is not None:
        records = records[: args.max_records]
    chat = _load_chat(args)
    exclude: set[int] = set()
    names = [args.model, chat.name]  # the vendor names of the persona negatives come from the model's names
    if args.adapter:
        from .runcard import read_run_card

        card = read_run_card(args.adapter)
        names += [card.get("base_model", {}).get("spec"), card.get("base_model", {}).get("resolved")]
        if not args.include_held_out:
            exclude = held_out_indices(card, args.data)
    system = args.system if args.system is not None else data_system_prompt(args.data, None) or chat.system_prompt
    persona = resolve(PersonaConfig(), system, names)
    result = build_pairs(
        chat,
        records,
        args.output,
        args.data,
        sampling,
        persona,
        system=system,
        persona_negatives=args.persona_negatives,
        resume=args.resume,
        exclude=exclude,
        batch_size=args.batch_size,
    )
    print("\n".join(result.lines()))
    print(f"train on them:  chatlora train --method dpo --data {result.output} --from-adapter ADAPTER")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    cfg = _config_from(args)
    print(f"chatlora quickstart: LoRA on {cfg.model} with {cfg.data} -> {cfg.output_dir}", flush=True)
    result, evaluation = quickstart(cfg, args.eval_samples)
    if evaluation is not None:
        print("\nHeld-out prompts (never trained on), greedy decoding:\n")
        for i, row in enumerate(evaluation.rows[: args.examples], 1):
            print(f"[{i}] prompt:    {row['prompt']}")
            print(f"    reference: {row['reference']}")
            print(f"    base:      {row['base']}")
            print(
                f"    tuned:     {row['tuned']}"
                + ("" if row["tuned_finish"] == "stop" else "  [cut at max_new_tokens]")
            )
            print()
    _print_paths(result.output_dir, result.run_card)
    if evaluation is not None:
        print()
        _print_eval(evaluation)
    print(f"\nchat with it:  .venv/bin/chatlora chat --adapter {result.output_dir}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    chat = _load_chat(args)
    if args.prompt is not None:
        reply = chat.generate([{"role": "user", "content": args.prompt}], sampling, system=args.system)
        print(reply.text)
        return 0
    from .inference.chat import repl

    repl(chat, sampling, args.system, input, _write, lambda line: print(line, file=sys.stderr))
    return 0


def _write(text: str) -> None:
    print(text, end="", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference.infer import ReplyFile, generate_file, read_prompts

    sampling = _sampling(args)
    if args.batch_size is not None and args.batch_size <= 0:
        raise CliError("--batch-size must be > 0")
    prompts = read_prompts(args.input)
    with ReplyFile(args.output, inputs={"--input": args.input}) as out:  # checked before the model loads
        chat = _load_chat(args)
        generate_file(chat, prompts, out, sampling, args.batch_size, args.system)
    print(f"wrote {len(prompts)} replies to {args.output}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    out = merge(args.adapter, args.output, overwrite=args.overwrite)
    print(f"merged model written to {out} (safetensors + tokenizer); try: chatlora chat --model {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_export, export, format_checks, run_commands

    if args.samples <= 0 or args.max_new_tokens <= 0:
        raise CliError("--samples and --max-new-tokens must be > 0")
    if args.check:
        if args.output or args.lora_only or args.quant or args.overwrite:
            raise CliError(
                "--check DIR checks an existing export; it takes no --output, --quant, --lora-only, --overwrite"
            )
        checks = check_export(
            args.check, source=args.adapter or args.model, samples=args.samples, max_new_tokens=args.max_new_tokens
        )
        print(format_checks(checks))
        failed = [c.name for c in checks if c.failed]
        print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'parity: all checks passed'}")
        return 1 if failed else 0
    if not args.output:
        raise CliError("--output DIR is required (or --check DIR to check an existing export)")
    result = export(
        args.adapter,
        args.output,
        model=args.model,
        quant=args.quant or "f16",
        lora_only=args.lora_only,
        overwrite=args.overwrite,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
    )
    for path in result.files:
        print(f"wrote {path}  ({path.stat().st_size / 2**20:.1f} MiB)")
    print()
    print(format_checks(result.checks))
    failed = [c.name for c in result.checks if c.failed]
    if failed:
        print(
            f"\nFAILED: {', '.join(failed)}: the export does not behave like the adapter (files kept for inspection)"
        )
        return 1
    print("\nparity: all checks passed")
    for line in run_commands(result.output_dir):
        print(line)
    return 0


def _print_eval(result) -> None:
    loss, tuned, base = result.loss, result.replies["tuned"], result.replies["base"]
    b, t = result.names["base"], result.names["tuned"]
    print(
        f"held-out loss: {b} {loss['base'].loss:.4f} -> {t} {loss['tuned'].loss:.4f} "
        f"(ratio {result.loss_ratio:.3f}) on {result.source['records']} records"
    )
    test = result.significance.get("chrF")
    print(
        f"chrF: {b} {base.chrf:.2f} -> {t} {tuned.chrf:.2f}"
        + (f" (paired bootstrap p = {test.p_value:.3f})" if test else "")
        + f" | stop rate: {b} {base.stop_rate:.1%}, {t} {tuned.stop_rate:.1%}"
    )
    if result.persona is not None:
        base, tuned = result.persona.probe_total("base"), result.persona.probe_total("tuned")
        print(
            f"persona probes: identity leaks {b} {base.leak_rate:.1%} -> {t} {tuned.leak_rate:.1%}, markers {b} "
            f"{base.marker_rate:.1%} -> {t} {tuned.marker_rate:.1%} ({tuned.n} replies each)"
        )
    for t in result.targets:
        print(f"  {t.verdict}  {t.name}: {t.detail}")
    from .eval.results import METRICS_JSON, REPLIES_JSONL, REPORT_HTML, REPORT_MD

    others = ", ".join((REPORT_MD, METRICS_JSON, REPLIES_JSONL))
    print(f"eval report: {result.output_dir / REPORT_HTML} (and {others})")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import EvalConfig, evaluate

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})  # a flag per field
    _print_eval(evaluate(cfg))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, parse_adapters, run
    except ModuleNotFoundError as e:
        raise CliError(f"serving needs the serve extra ({e.name} is missing): pip install 'chatlora[serve]'") from None

    if not args.adapter and not args.model:
        raise CliError("give --adapter DIR (or NAME=DIR, repeatable) or --model M (a base or merged model)")
    origins = args.allowed_origins if args.allowed_origins is not None else os.environ.get("CHATLORA_ORIGINS", "")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.name in vars(args)}
    flags.update(
        adapters=parse_adapters(args.adapter),
        max_body_bytes=int(args.max_body_bytes * 2**20),  # --max-body-mb
        allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(origins),
    )
    run(ServeConfig(**flags).check())
    return 0


def _names(text: str) -> list[str]:
    """``A,B`` -> ``["A", "B"]``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_studio(args: argparse.Namespace) -> int:
    try:
        from .studio import run
    except ModuleNotFoundError as e:
        raise CliError(
            f"the studio needs the serve extra ({e.name} is missing): pip install 'chatlora[serve]'"
        ) from None

    if not args.max_upload_mb > 0:
        raise CliError("--max-upload-mb must be > 0")
    origins = args.allowed_origins if args.allowed_origins is not None else os.environ.get("CHATLORA_ORIGINS", "")
    run(
        runs=args.runs,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_roots=args.models,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(origins),
    )
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatlora", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.description = "LoRA-tune a chat model on dialogue data, then chat with it."
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="validate a dataset and print statistics")
    check.add_argument("path")
    check.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "sharegpt", "trl"])
    check.add_argument("--columns", default=None, help="rename fields, e.g. instruction=prompt,output=response")
    check.add_argument(
        "--preference",
        action="store_true",
        help="a preference file (prompt, chosen, rejected: formats trl, sharegpt, alpaca) instead of SFT data",
    )
    model, max_length = TrainConfig.model, TrainConfig.max_length  # what train would use
    check.add_argument("--model", default=model, help=f"tokenizer for token lengths (default: {model})")
    check.add_argument(
        "--max-length",
        type=int,
        default=max_length,
        help=f"count conversations longer than this (default: {max_length})",
    )
    check.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt added to records without one when rendering (default: as train does: none, except the "
        "built-in prompt for the built-in data)",
    )
    check.add_argument("--no-tokenize", action="store_true", help="skip token-length statistics (no model needed)")
    check.add_argument("--json", action="store_true", help="print statistics as JSON")
    check.set_defaults(func=cmd_data_check)
    show = data.add_parser(
        "show", help="print records as the model will see them: control tokens and trained tokens marked"
    )
    show.add_argument("path")
    show.add_argument("-n", type=int, default=3, help="how many records, from the first (default: 3)")
    show.add_argument("--json", action="store_true", help='one JSON object per record: {"line", "tokens": [...]}')
    show.add_argument("--config", help="a train YAML whose rendering options apply (flags win)")
    show.add_argument("--model", default=None, help="whose tokenizer and chat template (default: embedded)")
    show.add_argument("--system-prompt", default=None, help="system prompt for records without one")
    show.add_argument(
        "--character", default=None, metavar="CARD", help="Character Card V2 (JSON or PNG) as the system prompt"
    )
    show.add_argument("--format", default=None, choices=["auto", "alpaca", "messages", "sharegpt"])
    show.add_argument("--columns", default=None, help="rename fields, e.g. instruction=prompt,output=response")
    show.add_argument("--max-length", type=int, default=None, help="cut conversations as train does")
    show.add_argument(
        "--train-on-user", action=argparse.BooleanOptionalAction, default=None, help="mark user text as trained too"
    )
    show.set_defaults(func=cmd_data_show)

    tr = sub.add_parser("train", help="LoRA-train a model on a dialogue dataset")
    _add_config_flags(tr)
    tr.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (data split, speed-ups, micro-batches, estimated peak memory vs free) and exit "
        "without loading weights",
    )
    tr.set_defaults(func=cmd_train)

    qs = sub.add_parser("quickstart", help="train on the embedded default and compare base vs tuned replies")
    _add_config_flags(qs)
    qs.add_argument("--examples", type=int, default=4, help="held-out prompts to show (default: 4)")
    qs.add_argument("--eval-samples", type=int, default=32, help="held-out records to evaluate (default: 32)")
    qs.set_defaults(func=cmd_quickstart)

    ch = sub.add_parser("chat", help="chat with a tuned (or base) model")
    _add_model_flags(ch)
    ch.add_argument("--prompt", default=None, help="answer this one prompt to stdout and exit")
    _add_sampling_flags(ch)
    ch.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="answer a JSONL of prompts in batches")
    _add_model_flags(gen)
    gen.add_argument(
        "--input", required=True, help='JSONL: {"messages": [...]} or {"prompt": "..."}, optional "system"'
    )
    gen.add_argument(
        "--output",
        required=True,
        help="JSONL: each input line plus reply and finish_reason; replaced when complete, never the --input",
    )
    gen.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts generated together, similar lengths batched (default: 64 on a GPU, 8 on the CPU)",
    )
    _add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)

    pr = sub.add_parser(
        "pairs", help="build preference pairs: the dataset's reply chosen, a model's own reply rejected (self-play)"
    )
    _add_model_flags(pr)
    pr.add_argument("--data", required=True, help="SFT dataset (JSON/JSONL, alpaca / messages / sharegpt)")
    pr.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "sharegpt"])
    pr.add_argument("--columns", default=None, help="rename fields, e.g. instruction=prompt,output=response")
    pr.add_argument("--output", required=True, help="JSONL of pairs (TRL's conversational shape), written as it goes")
    pr.add_argument("--resume", action="store_true", help="add the pairs still missing from an existing --output")
    pr.add_argument(
        "--persona-negatives",
        action="store_true",
        help="also one pair per record whose rejected side is an out-of-character self-description (AI, vendor)",
    )
    pr.add_argument(
        "--include-held-out",
        action="store_true",
        help="also use the records the --adapter's run held out (default: left out, so an eval on them is honest)",
    )
    pr.add_argument("--max-records", type=int, default=None, help="only the first N records")
    pr.add_argument("--batch-size", type=int, default=None, help="replies generated together (default: 64 GPU, 8 CPU)")
    _add_sampling_flags(pr, max_new_tokens=128)
    pr.set_defaults(func=cmd_pairs)

    mg = sub.add_parser("merge", help="merge an adapter into its base model (standalone safetensors)")
    mg.add_argument("--adapter", required=True)
    mg.add_argument("--output", required=True, help="folder for the merged model (new or empty)")
    mg.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --output, replacing the files merge writes"
    )
    mg.set_defaults(func=cmd_merge)

    ex = sub.add_parser("export", help="export to GGUF + Ollama Modelfile and prove it replies like the adapter")
    ex.add_argument("--adapter", help="a chatlora output dir (adapter + run card)")
    ex.add_argument("--model", help="a merged model dir (chatlora merge) instead of an adapter")
    ex.add_argument("--output", help="folder for the GGUF file, Modelfile and manifest (must be empty or new)")
    ex.add_argument(
        "--quant",
        default=None,
        help="weight type: f16 (default), f32, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, and the K-quants q6_k, q5_k_m, "
        "q4_k_m (written by llama.cpp: pip install 'chatlora[gguf]'); --lora-only: f16 or f32",
    )
    ex.add_argument("--lora-only", action="store_true", help="write the adapter alone as a llama.cpp LoRA GGUF")
    ex.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output")
    ex.add_argument("--check", metavar="DIR", help="only run the parity check on an existing export folder")
    ex.add_argument("--samples", type=int, default=8, help="held-out prompts the parity check uses (default: 8)")
    ex.add_argument("--max-new-tokens", type=int, default=48, help="greedy reply length compared (default: 48)")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser(
        "eval",
        help="compare an adapter with its base model (or another run) on held-out conversations; write a report",
    )
    from .settings import EvalConfig

    ev.add_argument("--adapter", required=True, help="a chatlora output dir (adapter + run card)")
    _add_setting(ev, EvalConfig, "against", metavar="base|DIR")
    _add_setting(ev, EvalConfig, "data")
    _add_setting(ev, EvalConfig, "format", choices=["auto", "alpaca", "messages", "sharegpt"])
    _add_setting(ev, EvalConfig, "columns")
    _add_setting(ev, EvalConfig, "output")
    _add_setting(ev, EvalConfig, "max_samples", type=int)
    for name in ("max_new_tokens", "batch_size", "examples"):
        _add_setting(ev, EvalConfig, name, type=int)
    _add_setting(ev, EvalConfig, "repetition_penalty", type=float)
    _add_device_flags(ev)
    _add_setting(ev, EvalConfig, "persona", action=argparse.BooleanOptionalAction, shown="on")
    _add_setting(ev, EvalConfig, "persona_config", metavar="FILE.yaml")
    ev.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API with a web chat page")
    sv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a chatlora output dir to serve, repeatable (name: the dir's name unless NAME=DIR)",
    )
    from .settings import MAX_BODY_BYTES, ServeConfig

    _add_setting(sv, ServeConfig, "model")
    _add_setting(sv, ServeConfig, "base_only", action="store_true")
    _add_device_flags(sv)
    _add_setting(sv, ServeConfig, "host")
    _add_setting(sv, ServeConfig, "port", type=int)
    _add_setting(sv, ServeConfig, "api_key")
    _add_setting(sv, ServeConfig, "max_batch", type=int)
    _add_setting(sv, ServeConfig, "max_queue", type=int)
    _add_setting(sv, ServeConfig, "default_max_tokens", "--max-tokens", type=int)
    _add_setting(sv, ServeConfig, "log_prompts", action="store_true")
    limits = sv.add_argument_group("limits and guards (see the README's Serve section)")
    mb = MAX_BODY_BYTES / 2**20
    _add_setting(
        limits, ServeConfig, "max_body_bytes", "--max-body-mb", type=float, default=mb, shown=f"{mb:g}", metavar="MB"
    )
    _add_setting(limits, ServeConfig, "max_messages", type=int)
    _add_setting(limits, ServeConfig, "read_timeout", type=float)
    _add_setting(limits, ServeConfig, "timeout_keep_alive", type=float)
    _add_setting(limits, ServeConfig, "max_connections", type=int)
    _add_setting(limits, ServeConfig, "allowed_hosts", default="", metavar="A,B", shown="none")
    _add_setting(limits, ServeConfig, "allowed_origins", default=None, metavar="A,B")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("studio", help="a local web app: upload, preview, plan, train live, eval, chat, export")
    st.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    st.add_argument("--port", type=int, default=7860, help="(default: 7860)")
    st.add_argument("--runs", default="runs/studio", help="folder of the studio's runs (default: runs/studio)")
    st.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose models (dirs, .gguf) the page may name, repeatable (default: only under --runs)",
    )
    st.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /api (env CHATLORA_API_KEY)"
    )
    st.add_argument("--max-upload-mb", type=float, default=64, help="larger uploads get 413 (default: 64)")
    st.add_argument(
        "--allowed-hosts", default="", metavar="A,B", help="Host names accepted besides IPs and localhost ('*': any)"
    )
    st.add_argument(
        "--allowed-origins",
        default=None,
        metavar="A,B",
        help="browser origins allowed besides the page's own (env CHATLORA_ORIGINS)",
    )
    st.set_defaults(func=cmd_studio)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (:class:`~chatlora.errors.ChatloraError`) exits 2 with its message on stderr;
    anything else is a bug in chatlora and keeps its traceback."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except ChatloraError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
