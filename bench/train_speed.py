"""Training speed and memory: the seed tutorial's recipe against chatlora, same data, same machine, one run.

    python3 bench/train_speed.py --device cuda     # `make bench-gpu`: Yi-6B- (and 14B-) shaped Llama, random weights
    python3 bench/train_speed.py --device cpu      # `make bench-cpu`: the embedded SmolLM2-135M

The seed rows run the tutorial's own code (its ``process_func`` with Yi ChatML strings and response-only labels, max
384 tokens, fp16 weights, bs 8 x accum 2, gradient checkpointing). chatlora rows run ``chatlora.training.train.train`` on the
Yi config (``configs/yi-6b-chat-huanhuan.yaml``) exactly as a user runs it, plus the row's flags: ``default`` adds
none. Both tokenize ``data/huanhuan.json`` with the SmolLM2 tokenizer (no Yi tokenizer offline; its 49152 ids fit
the 64000 vocab), which ships in ``bench/tokenizer/`` (xz, 0.45 MB), so the benchmark needs neither internet nor
the embedded model; the seed's tokenized workload is cached in ``bench/workload/`` (git-ignored).

Each row runs in its own process (clean peak memory, no kernel patches leaking). Real tokens are the
conversations' own tokens (padding excluded); time runs from the end of the warm-up steps to the end of the last
step, the device synchronised at both ends only (a sync per step would stall the CPU's run-ahead). chatlora rows
also print the pre-flight memory estimate beside the measured peak (``torch.cuda.max_memory_allocated``). On CPU the
seed (fp16, which this CPU has no units for) is timed over its first micro-batch from the start of training
(``--seed-micro-batches``). Prints a table, writes JSON, and ends with ``gpu speedup: X.XX×`` / ``cpu speedup:
X.XX×`` (the ``default`` row / the seed, real tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOAD = ROOT / "bench" / "workload"
SHIPPED_TOKENIZER = ROOT / "bench" / "tokenizer"  # SmolLM2-135M-Instruct's (see its README.md)
SEED_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛.<|im_end|>"
SEED_TARGETS = ["q_attn", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # sic: the seed's typo
MAX_LEN = 384
LOG_STEPS = 5  # the tutorial logs every 10; every step would add a host sync per step to both recipes
# Yi-6B's shape (01-ai/Yi-6B config.json), built with random weights.
YI_6B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=11008,
    vocab_size=64000,
    rope_theta=5_000_000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Qwen2.5-14B's dimensions on Llama layers (no q/k/v bias), built with random weights: the 24 GB QLoRA case.
SHAPE_14B = dict(
    YI_6B,
    hidden_size=5120,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=13824,
    vocab_size=152064,
    rope_theta=1_000_000.0,
)
YI_CONFIG = ROOT / "configs" / "yi-6b-chat-huanhuan.yaml"

# name -> (recipe, overrides). Seed rows: run_seed keyword arguments. chatlora rows: flags on top of the Yi config
# (the model, random init, step count and a temporary output dir are always set; nothing else unless listed).
VARIANTS: dict[str, tuple[str, dict]] = {
    "seed": ("seed", {}),
    # the tutorial with its fp16 weights swapped for fp32: what the seed costs where fp16 has no fast path (CPUs)
    "seed-fp32": ("seed", {"dtype": "fp32"}),
    "default": ("chatlora", {}),  # the Yi config as a user runs it: no speed flags
    "fp16": ("chatlora", {"dtype": "fp16", "memory_mode": True}),  # GPUs without bf16 (T4): 16 GB
    "qlora": ("chatlora", {"quantize": "4bit", "memory_mode": True}),
    "qlora-14b": ("chatlora", {"quantize": "4bit", "max_memory_gib": 22.0, "model": "14b"}),  # planned for 24 GB
    "memory": ("chatlora", {"memory_mode": True, "tokens_per_batch": 8192}),
    "best": ("chatlora", {"tokens_per_batch": 6144, "lora_dropout": 0.0}),
    "plain": ("chatlora", {"plain": True}),  # the HF Trainer path with chatlora's fixes, for comparison
    # calibration and exploration rows (bench/NOTES.md)
    "x-drop0": ("chatlora", {"lora_dropout": 0.0}),
    "x-4608": ("chatlora", {"tokens_per_batch": 4608, "lora_dropout": 0.0}),
    "x-eager": ("chatlora", {"compile": False, "liger": False}),
    "x-liger": ("chatlora", {"compile": False, "liger": True}),
    "x-full-loss": ("chatlora", {"compile": False, "liger": False, "logits_at_labels": False}),
    "x-mem-noliger": ("chatlora", {"memory_mode": True, "liger": False}),
    "x-fp16-fast": ("chatlora", {"dtype": "fp16"}),
    "x-qlora-fast": ("chatlora", {"quantize": "4bit", "memory_mode": False}),
    "x-qlora-compile": ("chatlora", {"quantize": "4bit", "memory_mode": False, "compile": True}),
    "x-dora": ("chatlora", {"dora": True}),
    "x-qlora-8k": ("chatlora", {"quantize": "4bit", "memory_mode": True, "tokens_per_batch": 8192}),
    "x-cudagraphs": ("chatlora", {}),  # default, layers compiled with mode="reduce-overhead" (CUDA graphs)
    "x-profile": ("chatlora", {}),  # default, with a CUDA kernel profile of two steps after the timed ones
    "cpu-default": ("chatlora", {}),  # on CPU: `chatlora train` on the embedded model, no flags
    # `chatlora train --method dpo` with the row's config, on pairs built from the workload (see stand_in_pairs)
    "dpo": ("chatlora", {"method": "dpo"}),
    "cpu-dpo": ("chatlora", {"method": "dpo"}),
}
DEFAULTS = {
    "cuda": ["seed", "default", "fp16", "qlora", "qlora-14b", "memory", "best"],
    "cpu": ["seed", "cpu-default", "seed-fp32"],
}
STEPS = {"fp16": (5, 45)}  # (warm-up, timed) where a row needs its own: fp16's loss is followed over 50 steps


# --------------------------------------------------------------------------------------------- workload
def seed_process_func(example: dict, tokenizer) -> dict:
    """The seed tutorial's process_func, verbatim apart from returning plain lists."""
    instruction = tokenizer(
        "\n".join(
            [
                "<|im_start|>system",
                SEED_SYSTEM + "\n<|im_start|>user\n" + example["instruction"] + example["input"] + "<|im_end|>\n",
            ]
        ).strip(),
        add_special_tokens=False,
    )
    response = tokenizer("<|im_start|>assistant\n" + example["output"] + "<|im_end|>\n", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    return {"input_ids": input_ids[:MAX_LEN], "attention_mask": attention_mask[:MAX_LEN], "labels": labels[:MAX_LEN]}


def load_workload() -> tuple[list[dict], object]:
    """Tokenized workload + tokenizer, from bench/workload/ or built there from the tokenizer in bench/tokenizer/."""
    from transformers import AutoTokenizer

    data_file, tok_dir = WORKLOAD / "huanhuan-seed.json", WORKLOAD / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        import lzma
        import shutil

        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in SHIPPED_TOKENIZER.iterdir():
            if f.suffix == ".xz":
                (tok_dir / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
            elif f.name != "README.md":
                shutil.copy(f, tok_dir / f.name)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not data_file.is_file():
        rows = json.loads((ROOT / "data" / "huanhuan.json").read_text(encoding="utf-8"))
        data_file.write_text(json.dumps([seed_process_func(r, tokenizer) for r in rows]), encoding="utf-8")
    return json.loads(data_file.read_text(encoding="utf-8")), tokenizer


def shape_dir(tokenizer, name: str = "yi-6b-shape", shape: dict = YI_6B) -> Path:
    """A model dir holding only config.json + tokenizer: what `chatlora train --model DIR --random-init` takes."""
    from transformers import LlamaConfig

    d = WORKLOAD / name
    if not (d / "config.json").is_file():
        LlamaConfig(**shape).save_pretrained(d)
        tokenizer.save_pretrained(d)
    return d


def yi6b_dir(tokenizer) -> Path:
    return shape_dir(tokenizer)


# --------------------------------------------------------------------------------------------- one recipe
class Enough(Exception):
    """Raised by the timer once ``stop_after`` micro-batches are done: ends a run that is timed on micro-batches."""


class Timer:
    """Time and token count at the end of the warm-up and at the end of the last timed step, the device
    synchronised there only. ``tokens()`` returns the real tokens trained so far. With ``stop_after``, training
    is cut off (:class:`Enough`) after that many micro-batches, timed from the start of training."""

    def __init__(self, device, warmup: int, last: int, stop_after: int = 0):
        self.device, self.warmup, self.last, self.stop_after = device, warmup, last, stop_after
        self.marks: dict[str, tuple[float, int]] = {}
        self.micro = 0
        self.tokens = lambda state: 0
        self.model = None
        self.profile_at = 0

    def _now(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                timer.model = model
                timer.marks["begin"] = (timer._now(), timer.tokens(state))

            def on_substep_end(self, args, state, control, **kw):  # a micro-batch that is not a step's last
                timer.micro += 1
                if timer.stop_after and timer.micro >= timer.stop_after:
                    timer.marks["end"] = (timer._now(), timer.tokens(state))
                    raise Enough

            def on_step_begin(self, args, state, control, **kw):
                if timer.profile_at and state.global_step == timer.profile_at:
                    import torch

                    torch.cuda.synchronize()
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()
                    self.prof_t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if timer.profile_at and state.global_step == timer.profile_at + 2:
                    wall = timer._now() - self.prof_t0
                    self.prof.__exit__(None, None, None)
                    events = self.prof.key_averages()
                    busy = sum(e.self_device_time_total for e in events) / 1e6
                    print(f"profile: 2 steps, wall {wall * 1e3:.1f} ms, GPU kernels {busy * 1e3:.1f} ms", flush=True)
                    print(events.table(sort_by="self_device_time_total", row_limit=25), flush=True)
                timer.micro += 1
                if state.global_step == timer.warmup:
                    timer.marks["warm"] = (timer._now(), timer.tokens(state))
                if state.global_step == timer.last:
                    timer.marks["end"] = (timer._now(), timer.tokens(state))
                if timer.stop_after and timer.micro >= timer.stop_after:
                    timer.marks.setdefault("end", (timer._now(), timer.tokens(state)))
                    raise Enough

        return StepTimer()


def _args_kw(steps: int, out: str, cpu: bool) -> dict:
    return dict(
        output_dir=out,
        max_steps=steps,
        logging_steps=1 if cpu else LOG_STEPS,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=42,
        log_level="warning",
    )


def run_seed(examples, tokenizer, model_dir, device, timer: Timer, out, dtype="fp16"):
    """The tutorial: fp16 weights, its LoraConfig, bs 8 x accum 2, gradient checkpointing, Seq2Seq padding, lr 1e-4.
    ``dtype="fp32"`` is the one deviation offered (the ``seed-fp32`` variant)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    weights = {"fp16": torch.half, "fp32": torch.float32}[dtype]
    if device == "cuda":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=weights)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    model.enable_input_require_grads()
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=SEED_TARGETS,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=0.1,
    )
    model = get_peft_model(model, config)
    kw = dict(
        output_dir=out,
        max_steps=timer.last + (2 if timer.profile_at else 0),
        logging_steps=1 if device == "cpu" else LOG_STEPS,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=42,
        log_level="warning",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
    )
    fields = TrainingArguments.__dataclass_fields__
    kw["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    seen = [0]

    def count(module, args, kwargs):
        seen[0] += int(kwargs["attention_mask"].sum())

    # Real tokens are counted as the model consumes them. Counting them in the collator counted the micro-batches the
    # DataLoader had fetched ahead too: with transformers 5.25 the seed's first micro-batch "held" 8,064 real tokens
    # (8 conversations of at most 384), inflating its tokens/s ~3x (bench/NOTES.md "Issue 30").
    model.register_forward_pre_hook(count, with_kwargs=True)
    timer.tokens = lambda state: seen[0]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**kw),
        train_dataset=_List([dict(ex) for ex in examples]),
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
        callbacks=[timer.callback()],
    )
    try:
        trainer.train()
    except Enough:
        pass
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses}


def stand_in_pairs(path: Path) -> Path:
    """Preference pairs of the Huanhuan records for the speed rows: each record's reply chosen, the next record's
    reply rejected. The lengths are the data's, as in self-play pairs (``chatlora pairs``); the content does not
    matter to the speed, and no model has to generate them first."""
    rows = json.loads((ROOT / "data" / "huanhuan.json").read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as f:
        for row, other in zip(rows, rows[1:] + rows[:1], strict=True):
            if row["output"].strip() == other["output"].strip():
                continue
            prompt = [{"role": "user", "content": (row["instruction"] + row["input"]).strip()}]
            pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["output"]}]}
            pair["rejected"] = [{"role": "assistant", "content": other["output"]}]
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return path


def run_chatlora(device: str, model_dir: Path, timer: Timer, out: str, overrides: dict) -> dict:
    """``chatlora train --config configs/yi-6b-chat-huanhuan.yaml`` (GPU) or ``chatlora train`` (CPU, embedded
    model) with the row's flags, as the CLI runs it; ``method`` other than sft trains on :func:`stand_in_pairs`."""
    from chatlora.config import load_config
    from chatlora.training.train import train

    method = overrides.get("method", "sft")
    if method != "sft":
        from chatlora.training.align import train_preference as train

    base = dict(
        model=str(model_dir),
        data=str(ROOT / "data" / "huanhuan.json")
        if method == "sft"
        else str(stand_in_pairs(Path(tempfile.mkdtemp()) / "pairs.jsonl")),
        output_dir=out,
        max_steps=timer.last + (2 if timer.profile_at else 0),
        random_init=device == "cuda",
        device=device,
        eval_steps=0,
        save_steps=10**6,
        **({} if device == "cuda" else {"logging_steps": 1}),
    )
    cfg = load_config(YI_CONFIG if device == "cuda" else None, {**base, **overrides})
    timer.tokens = lambda state: state.num_input_tokens_seen
    card = train(cfg, callbacks=[timer.callback()]).run_card
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "losses": [r["loss"] for r in rows if "loss" in r],
        "skipped_steps": card["results"]["fp16_skipped_steps"],
        "estimate_gib": card["hardware"]["estimated_peak_gib"],
        "plan": card["plan"],
    }


class _List:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def one(name: str, device: str, warmup: int, steps: int, result_path: str, micro_batches: int = 0) -> None:
    import torch

    recipe, overrides = VARIANTS[name]
    overrides = dict(overrides)
    examples, tokenizer = load_workload()
    if device == "cpu":
        model_dir = Path(_embedded_dir())
    elif overrides.pop("model", None) == "14b":
        model_dir = shape_dir(tokenizer, "14b-shape", SHAPE_14B)
    else:
        model_dir = yi6b_dir(tokenizer)
    torch.manual_seed(0)
    timer = Timer(device, warmup, warmup + steps, stop_after=micro_batches)
    if name == "x-profile":
        timer.profile_at = warmup + steps
    if name == "x-cudagraphs":
        import chatlora.training.train

        def compile_layers(model) -> int:
            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            for layer in layers:
                layer.compile(mode="reduce-overhead")
            return len(layers)

        chatlora.training.train.compile_layers = compile_layers
    with tempfile.TemporaryDirectory() as out:
        if recipe == "seed":
            extra = run_seed(examples, tokenizer, model_dir, device, timer, out, **overrides)
            accum = 2
        else:
            extra = run_chatlora(device, model_dir, timer, out, overrides)
            accum = extra["plan"]["batches"]["micro_batches_per_step"]
    if micro_batches:  # timed from the start of training over its first micro-batches
        (t0, tok0), (t1, tok1) = timer.marks["begin"], timer.marks["end"]
        steps = micro_batches / accum
    else:
        (t0, tok0), (t1, tok1) = timer.marks["warm" if warmup else "begin"], timer.marks["end"]
    model = timer.model
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) if model is not None else 0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    losses = extra.pop("losses")
    row = {
        "variant": name,
        "recipe": recipe,
        "overrides": overrides,
        "tokens_per_s": (tok1 - tok0) / (t1 - t0),
        "step_s": (t1 - t0) / steps,
        "tokens_per_step": (tok1 - tok0) / steps,
        "peak_gib": peak,
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "nonfinite_losses": sum(1 for x in losses if x != x or x in (float("inf"), float("-inf"))),
        "params": params,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "timed_micro_batches": micro_batches or None,
        **extra,
    }
    Path(result_path).write_text(json.dumps(row), encoding="utf-8")


def _embedded_dir() -> str:
    from chatlora.model import resolve_model

    return resolve_model("embedded")


def matmul_tflops() -> float:
    """The card's measured dense bf16 matmul rate (8192^3, median of 20), the MFU denominator."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


# --------------------------------------------------------------------------------------------- driver
def _child(name: str, a, warmup: int, steps: int, seed_micro: int, result: str) -> subprocess.Popen:
    w, n = STEPS.get(name, (warmup, steps))
    cmd = [sys.executable, __file__, "--device", a.device, "--one", name, "--result", result]
    cmd += [
        "--warmup",
        str(w),
        "--steps",
        str(n),
        "--micro-batches",
        str(seed_micro if name.startswith("seed") else 0),
    ]
    env = {
        **os.environ,
        # one GPU: on a machine with several, the seed's plain Trainer would otherwise use nn.DataParallel
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        # what `chatlora` (cli.py) sets for every run: packed shapes vary
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    }
    return subprocess.Popen(cmd, env=env)


def _table(info: dict, rows: list[dict]) -> None:
    cuda = info["device"] == "cuda"
    mem = "peak GiB" if cuda else "max RSS GiB"
    print(f"\n{info['card']}" + (f", bf16 matmul {info['matmul_tflops']:.0f} TFLOP/s" if cuda else ""))
    head = f"{'variant':<16} {'real tok/s':>10} {'step s':>7} {'tok/step':>8} {mem:>11}"
    head += f" {'estimate':>8} {'est/peak':>8}" if cuda else ""
    print(head + f" {'loss first→last':>16}" + (f" {'MFU':>6}" if cuda else ""))
    for r in rows:
        if "failed" in r:
            print(f"{r['variant']:<16} failed (exit {r['failed']})")
            continue
        line = (
            f"{r['variant']:<16} {r['tokens_per_s']:>10.0f} {r['step_s']:>7.3f} {r['tokens_per_step']:>8.0f} "
            f"{r['peak_gib']:>11.2f}"
        )
        if cuda:
            est = r.get("estimate_gib")
            line += f" {est:>8.2f} {est / r['peak_gib']:>8.2f}" if est else f" {'-':>8} {'-':>8}"
        loss = f"{r['first_loss'] or float('nan'):.2f}→{r['final_loss'] or float('nan'):.2f}"
        print(line + f" {loss:>16}" + (f" {r['mfu']:>6.1%}" if cuda else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    p.add_argument("--seed-warmup", type=int, default=None, help="the seed recipe's (default: --warmup)")
    p.add_argument("--seed-steps", type=int, default=None, help="the seed recipe's (default: --steps)")
    p.add_argument(
        "--seed-micro-batches",
        type=int,
        default=None,
        help="time the seed over its first N micro-batches from the start instead of steps (default: 1 on CPU)",
    )
    p.add_argument("--micro-batches", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 15 GPU, 2 CPU)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="rows run at once (memory calibration only: their speeds then disturb each other)",
    )
    p.add_argument("--json", default=None, help="result file (default bench/results/train_speed-DEVICE.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    warmup = a.warmup if a.warmup is not None else (5 if a.device == "cuda" else 1)
    steps = a.steps if a.steps is not None else (15 if a.device == "cuda" else 2)
    seed_warmup = a.seed_warmup if a.seed_warmup is not None else warmup
    seed_steps = a.seed_steps if a.seed_steps is not None else steps
    # fp16 on a CPU without fp16 units: one seed micro-batch (8 conversations) takes minutes, so on CPU the seed is
    # timed over its first micro-batch from the start of training (first-call overhead is small against that)
    seed_micro = a.seed_micro_batches if a.seed_micro_batches is not None else (1 if a.device == "cpu" else 0)
    if a.one:
        one(a.one, a.device, warmup, steps, a.result, a.micro_batches)
        return 0

    names = a.variants.split(",") if a.variants else DEFAULTS[a.device]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}")
    _, tokenizer = load_workload()  # build the caches once, before the children
    yi6b_dir(tokenizer)
    shape_dir(tokenizer, "14b-shape", SHAPE_14B)
    info: dict = {
        "device": a.device,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "seed_steps": [seed_warmup, seed_steps],
        "seed_micro_batches": seed_micro or None,
        "jobs": a.jobs,
    }
    import torch

    if a.device == "cuda":
        info["card"] = torch.cuda.get_device_name()
        info["matmul_tflops"] = matmul_tflops()
        torch.cuda.empty_cache()
    else:
        info["card"] = f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    import peft
    import transformers

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for extra in ("liger-kernel", "bitsandbytes"):
        try:
            info["versions"][extra] = version(extra)
        except PackageNotFoundError:
            info["versions"][extra] = None
    results: dict[str, dict] = {}
    pending = list(names)
    running: list[tuple[str, subprocess.Popen, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < max(1, a.jobs):
                name = pending.pop(0)
                result = str(Path(tmp) / f"{name}.json")
                w, n = (seed_warmup, seed_steps) if name.startswith("seed") else (warmup, steps)
                running.append((name, _child(name, a, w, n, seed_micro, result), result, time.time()))
            time.sleep(0.5)
            for item in list(running):
                name, proc, result, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0 or not Path(result).is_file():
                    print(f"[{name}] failed (exit {proc.returncode})", flush=True)
                    results[name] = {"variant": name, "failed": proc.returncode}
                    continue
                row = json.loads(Path(result).read_text())
                row["wall_s"] = round(time.time() - t0, 1)
                if a.device == "cuda":
                    row["mfu"] = 4 * row["params"] * row["tokens_per_s"] / (info["matmul_tflops"] * 1e12)
                results[name] = row
                est = f", estimate {row['estimate_gib']:.1f}" if row.get("estimate_gib") else ""
                print(
                    f"[{name}] {row['tokens_per_s']:.0f} real tok/s, peak {row['peak_gib']:.2f} GiB{est}", flush=True
                )
    rows = [results[n] for n in names]
    info["results"] = rows
    out = Path(a.json or ROOT / "bench" / "results" / f"train_speed-{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _table(info, rows)
    print(f"results: {out}" + (" (rows ran in parallel: speeds disturbed)" if a.jobs > 1 else ""))
    ok = {r["variant"]: r for r in rows if "failed" not in r}
    if "fp16" in ok:
        r = ok["fp16"]
        print(
            f"fp16: loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} over {r['warmup_steps'] + r['timed_steps']:.0f}"
            f" steps, {r['nonfinite_losses']} non-finite logged losses, {r['skipped_steps']} steps skipped by the "
            "loss scaler"
        )
    fast = ok.get("default") or ok.get("cpu-default")
    if fast and "seed-fp32" in ok:  # informational; the contract line below compares with the seed as written
        print(f"{fast['variant']} / seed-fp32: {fast['tokens_per_s'] / ok['seed-fp32']['tokens_per_s']:.2f}×")
    speedup = fast["tokens_per_s"] / ok["seed"]["tokens_per_s"] if fast and "seed" in ok else float("nan")
    print(f"{'gpu' if a.device == 'cuda' else 'cpu'} speedup: {speedup:.2f}×")
    return 0 if speedup == speedup else 1


if __name__ == "__main__":
    sys.exit(main())
