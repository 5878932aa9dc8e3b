"""Command line: parses flags and calls the library. No logic lives here."""

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
    return load_config(args.config, overrides)


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="(default: 1.1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2, on the reply (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2, on the reply (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default: {max_new_tokens})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible replies")


def _sampling(args: argparse.Namespace):
    from .infer import SamplingConfig

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
        help="Character Card V2 JSON compiled into the system prompt, as train does (default: the adapter's own)",
    )
    _add_device_flags(p)


def _load_chat(args: argparse.Namespace):
    from .infer import ChatModel

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
    from .data import describe, load_records, parse_columns

    records = load_records(args.path, args.format, parse_columns(args.columns))
    stats = describe(records)
    warnings: list[str] = []
    if not args.no_tokenize:
        from .model import load_tokenizer, resolve_model
        from .template import control_token_warnings, token_length_stats

        tokenizer = load_tokenizer(resolve_model(args.model))
        messages = [r.messages for r in records]
        added = data_system_prompt(args.path, args.system_prompt)
        stats["tokens"] = token_length_stats(messages, tokenizer, added, args.max_length)
        warnings = control_token_warnings(records, tokenizer, args.path)
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
    res = card.get("results", {})
    print(f"adapter:     {out}  (PEFT format; run card {out / 'chatlora.json'})")
    print(f"metrics:     {out / 'metrics.jsonl'}")
    if (out / "loss.png").exists():
        print(f"loss plot:   {out / 'loss.png'}")
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
    from .train import prepare_run, train

    cfg = _config_from(args)
    if args.dry_run:
        run = prepare_run(cfg)
        print("\n".join(run.lines()))
        print("dry run: no weights loaded, nothing written")
        return 0
    result = train(cfg)
    if result.run_card:
        _print_paths(result.output_dir, result.run_card)
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
    print(f"chatting with {chat.name} — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        stream = chat.stream(history, sampling, system=args.system)
        print(f"{chat.name}> ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        if stream.reply.finish_reason == "length":
            print("(reply cut at --max-new-tokens)", file=sys.stderr)
        history.append({"role": "assistant", "content": stream.reply.text})


def cmd_generate(args: argparse.Namespace) -> int:
    from .infer import ReplyFile, generate_file, read_prompts

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
    print(
        f"held-out loss: base {loss['base'].loss:.4f} -> tuned {loss['tuned'].loss:.4f} "
        f"(ratio {result.loss_ratio:.3f}) on {result.source['records']} records"
    )
    test = result.significance.get("chrF")
    print(
        f"chrF: base {base.chrf:.2f} -> tuned {tuned.chrf:.2f}"
        + (f" (paired bootstrap p = {test.p_value:.3f})" if test else "")
        + f" | stop rate: base {base.stop_rate:.1%}, tuned {tuned.stop_rate:.1%}"
    )
    if result.persona is not None:
        base, tuned = result.persona.probe_total("base"), result.persona.probe_total("tuned")
        print(
            f"persona probes: identity leaks base {base.leak_rate:.1%} -> tuned {tuned.leak_rate:.1%}, markers base "
            f"{base.marker_rate:.1%} -> tuned {tuned.marker_rate:.1%} ({tuned.n} replies each)"
        )
    for t in result.targets:
        print(f"  {t.verdict}  {t.name}: {t.detail}")
    print(f"eval report: {result.output_dir / 'report.html'} (and report.md, metrics.json, replies.jsonl)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import EvalConfig, evaluate

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})  # a flag per field
    _print_eval(evaluate(cfg))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import parse_adapters, run
    except ModuleNotFoundError as e:
        raise CliError(f"serving needs the serve extra ({e.name} is missing): pip install 'chatlora[serve]'") from None

    if not args.adapter and not args.model:
        raise CliError("give --adapter DIR (or NAME=DIR, repeatable) or --model M (a base or merged model)")
    if args.max_queue < 0 or args.max_tokens <= 0 or (args.max_batch is not None and args.max_batch <= 0):
        raise CliError("--max-queue must be >= 0, --max-tokens and --max-batch > 0")
    for flag in ("max_body_mb", "max_messages", "read_timeout", "timeout_keep_alive", "max_connections"):
        if not getattr(args, flag) > 0:
            raise CliError(f"--{flag.replace('_', '-')} must be > 0")
    origins = args.allowed_origins if args.allowed_origins is not None else os.environ.get("CHATLORA_ORIGINS", "")
    run(
        adapters=parse_adapters(args.adapter),
        model=args.model,
        base_only=args.base_only,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("CHATLORA_API_KEY"),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        log_prompts=args.log_prompts,
        default_max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_messages=args.max_messages,
        read_timeout=args.read_timeout,
        timeout_keep_alive=args.timeout_keep_alive,
        max_connections=args.max_connections,
        allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()],
        allowed_origins=[o.strip() for o in origins.split(",") if o.strip()],
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
    check.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "sharegpt"])
    check.add_argument("--columns", default=None, help="rename fields, e.g. instruction=prompt,output=response")
    check.add_argument("--model", default="embedded", help="tokenizer for token lengths (default: embedded)")
    check.add_argument("--max-length", type=int, default=384, help="count conversations longer than this")
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
    show.add_argument("--character", default=None, metavar="CARD", help="Character Card V2 JSON as the system prompt")
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
    ex.add_argument("--format", default="gguf", choices=["gguf"], help="(default: gguf)")
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

    ev = sub.add_parser("eval", help="compare base and tuned model on held-out conversations; write a report")
    ev.add_argument("--adapter", required=True, help="a chatlora output dir (adapter + run card)")
    ev.add_argument("--data", default=None, help="evaluate this dataset file instead of the run's held-out split")
    ev.add_argument(
        "--format",
        default="auto",
        choices=["auto", "alpaca", "messages", "sharegpt"],
        help="format of --data (default: auto)",
    )
    ev.add_argument("--columns", default=None, help="field renames for --data, e.g. instruction=prompt")
    ev.add_argument("--output", default=None, help="report folder (default: ADAPTER/eval)")
    ev.add_argument("--max-samples", type=int, default=None, help="evaluate at most N records (default: all)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="reply token limit (default: 128)")
    ev.add_argument("--batch-size", type=int, default=8, help="conversations per batch (default: 8)")
    ev.add_argument("--repetition-penalty", type=float, default=1.1, help="greedy decoding's penalty (default: 1.1)")
    ev.add_argument("--examples", type=int, default=10, help="replies shown in the report (default: 10)")
    _add_device_flags(ev)
    ev.add_argument(
        "--persona",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the persona section: identity probes, drift, retention (default: on)",
    )
    ev.add_argument(
        "--persona-config",
        default=None,
        metavar="FILE.yaml",
        help="a training YAML whose persona: block replaces the run's (README Persona eval)",
    )
    ev.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="serve adapters over an OpenAI-compatible API with a web chat page")
    sv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a chatlora output dir to serve, repeatable (name: the dir's name unless NAME=DIR)",
    )
    sv.add_argument(
        "--model", help="base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapters' base"
    )
    sv.add_argument("--base-only", action="store_true", help="serve only the base model of the adapters")
    _add_device_flags(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    sv.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (env CHATLORA_API_KEY)"
    )
    sv.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="requests generated together; 1: one at a time (default: 64 on a GPU, 8 on the CPU)",
    )
    sv.add_argument(
        "--max-queue", type=int, default=16, help="requests waiting beyond a full batch; more get 503 (default: 16)"
    )
    sv.add_argument("--max-tokens", type=int, default=256, help="reply limit when a request sets none (default: 256)")
    sv.add_argument("--log-prompts", action="store_true", help="also log request messages (off: prompts stay private)")
    limits = sv.add_argument_group("limits and guards (see the README's Serve section)")
    limits.add_argument("--max-body-mb", type=float, default=8, help="larger request bodies get 413 (default: 8)")
    limits.add_argument(
        "--max-messages", type=int, default=1000, help="requests with more messages get 400 (default: 1000)"
    )
    limits.add_argument(
        "--read-timeout",
        type=float,
        default=30,
        help="seconds a client has to send a whole request, headers and body; slower ones are dropped (default: 30)",
    )
    limits.add_argument(
        "--timeout-keep-alive", type=float, default=5, help="seconds an idle connection stays open (default: 5)"
    )
    limits.add_argument(
        "--max-connections", type=int, default=128, help="open connections; more get 503 (default: 128)"
    )
    limits.add_argument(
        "--allowed-hosts",
        default="",
        metavar="A,B",
        help="Host names accepted besides IP addresses, localhost and --host ('*': any); checked without --api-key",
    )
    limits.add_argument(
        "--allowed-origins",
        default=None,
        metavar="A,B",
        help="browser origins allowed besides the page's own, globs like http://localhost:* ('*': any), also "
        "answered with CORS headers (env CHATLORA_ORIGINS)",
    )
    sv.set_defaults(func=cmd_serve)
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
