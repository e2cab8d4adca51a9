"""`run.py finetune`: supervised fine-tuning on chat data, with a LoRA adapter (default) or all weights (--full).

    python run.py finetune --data chat.jsonl --out runs/x                  # LoRA r8 on q/v of the embedded model
    python run.py finetune --model M --data chat.jsonl --out runs/x --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj
    python run.py finetune --data chat.jsonl --out runs/x --full --lr 2e-5
    python run.py finetune --out runs/x --resume                            # continue exactly where runs/x stopped

--data is a JSONL file, one {"messages": [...]} per line (npllama.train.sft says what is trained on and what
is skipped). Runs on the same Trainer as `train`: progress lines, the held-out split's loss, atomic
checkpoints (a LoRA run's hold only the adapter), history.jsonl, loss.png. Writes <out>/final: the adapter in
PEFT's format (adapter_config.json + adapter_model.safetensors; `run.py generate --adapter <out>/final`
uses it), or with --full the whole model in HF layout with its tokenizer.
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict
from typing import Any

from npllama.cli import UsageError, _number
from npllama.train import cli as train_cli
from npllama.train.trainer import TrainConfig, Trainer

# a fine-tuning run's defaults where they differ from training from scratch (TrainConfig's)
DEFAULTS = dict(steps=100, batch_size=8, seq_len=512, lr=2e-4, warmup=10, weight_decay=0.0, eval_every=25,
                eval_batches=10, save_every=50, log_every=5)
FULL_LR = 2e-5
LORA = dict(lora_r=8, lora_alpha=16.0, lora_targets="q_proj,v_proj", lora_dropout=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `finetune` flags to a parser."""
    src = parser.add_argument_group("model, data and output")
    src.add_argument("--model", metavar="PATH", help="the model to fine-tune: an HF dir or a .gguf file "
                     "(default: the embedded SmolLM2-135M-Instruct)")
    src.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or dir (default: the model's)")
    src.add_argument("--data", metavar="JSONL", help='chat data: one {"messages": [{"role", "content"}, ...]} '
                     "per line")
    src.add_argument("--out", required=True, help="output dir: checkpoints, history, loss.png, final/")
    src.add_argument("--val-fraction", type=_number(float, 0, 1), default=0.1,
                     help="share of the conversations held out (the last ones; default 0.1)")
    src.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue from --out's latest checkpoint (or the given one), exactly")
    lo = parser.add_argument_group("LoRA (the default) or --full")
    lo.add_argument("--full", action="store_true", help="train all the weights instead of a LoRA adapter")
    lo.add_argument("--lora-r", type=_number(int, 1), default=None, help=f"rank [{LORA['lora_r']}]")
    lo.add_argument("--lora-alpha", type=_number(float, 0, low_open=True), default=None,
                    help=f"scale alpha (alpha / r) [{LORA['lora_alpha']:g}]")
    lo.add_argument("--lora-targets", default=None, metavar="NAMES",
                    help=f"comma-separated projections among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                         f"down_proj, or 'all' [{LORA['lora_targets']}]")
    lo.add_argument("--lora-dropout", type=_number(float, 0, 1), default=None,
                    help=f"dropout on the adapter's input, in [0, 1) [{LORA['lora_dropout']:g}]")
    lo.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    train_cli.add_training_arguments(parser, DEFAULTS)


def _lora_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The adapter's settings from the flags (checked before anything is loaded), or None with --full."""
    from npllama.lora import TARGETS
    given = [f"--{k.replace('_', '-')}" for k in LORA if getattr(args, k) is not None] + \
        (["--rslora"] if args.rslora else [])
    if args.full:
        if given:
            raise UsageError(f"{given[0]} configures a LoRA adapter: it does not go with --full")
        return None
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in LORA.items()}
    if not 0 <= s["lora_dropout"] < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {s['lora_dropout']}")
    names = [t.strip() for t in s["lora_targets"].split(",") if t.strip()]
    if names == ["all"]:
        names = list(TARGETS)
    if not names:
        raise UsageError("--lora-targets is empty")
    for t in names:
        if t not in TARGETS:
            raise UsageError(f"--lora-targets: {t!r} is not a projection LoRA can adapt (one of {', '.join(TARGETS)})")
    return {"r": s["lora_r"], "alpha": float(s["lora_alpha"]), "targets": names, "dropout": s["lora_dropout"],
            "rslora": bool(args.rslora)}


def _settings(args: argparse.Namespace, base: dict[str, Any] | None) -> tuple[TrainConfig, list[str]]:
    """The run's TrainConfig: the saved one on --resume (flags given again override it), else finetune's defaults."""
    if base is not None:
        return train_cli._settings(args, base)
    d = {**asdict(TrainConfig()), **DEFAULTS, **({"lr": FULL_LR} if args.full else {})}
    for flag, field_ in train_cli._SETTINGS.items():
        if getattr(args, flag, None) is not None:
            d[field_] = getattr(args, flag)
    if args.min_lr is None:
        d["min_lr"] = d["lr"] / 10
    if args.warmup is None:
        d["warmup"] = min(d["warmup"], d["steps"] // 10)
    try:
        return TrainConfig.from_dict(d), []
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Run `finetune` with parsed arguments; returns the exit code (0 done, 1 diverged); user mistakes raise."""
    return train_cli.run_on_ranks(args, _run, check=_check)


def _check(args: argparse.Namespace) -> None:
    """Bad flags are reported before the output folder is made."""
    if args.resume is None:
        _lora_settings(args)
        if not args.data:
            raise UsageError("--data is required (a JSONL file of conversations), unless --resume")


def _model_path(path: str | None) -> str:
    if path is None:
        from npllama.io.defaults import default_model_path
        return default_model_path()
    if not os.path.exists(path):
        raise UsageError(f"--model {path}: no such file or directory")
    return path


def _run(args: argparse.Namespace, world: Any = None) -> int:
    from npllama import lora
    from npllama.model import Llama
    from npllama.tokenizer import Tokenizer
    from npllama.train.checkpoint import latest_checkpoint, load_checkpoint
    from npllama.train.sft import SFTBatcher, SFTEval, load_sft, split, stats_dict
    saved, ck_path = None, None
    if args.resume:
        ck_path = latest_checkpoint(os.path.join(args.out, "checkpoints")) if args.resume == "latest" else args.resume
        if ck_path is None:
            raise UsageError(f"--resume: no checkpoint under {os.path.join(args.out, 'checkpoints')}")
        saved = load_checkpoint(ck_path)["state"]
        meta = saved.get("run", {})
        if meta.get("kind") != "finetune":
            raise UsageError(f"--resume: {ck_path} is not a finetune checkpoint (resume it with `train`)")
        if args.full or any(getattr(args, k) is not None for k in LORA):
            raise UsageError("--resume keeps the run's --full / --lora-* settings: leave them out")
        args.full = meta["full"]
        args.model, args.tokenizer = meta["model"], meta["tokenizer"]
        args.data = args.data or meta["data"]
        args.val_fraction = meta["val_fraction"]
        lora_cfg = meta["lora"]
        cfg, changed = _settings(args, saved["train_config"])
        if changed:
            print("npllama: note: resuming with changed settings (no longer bit-exact): " + ", ".join(changed))
    else:
        lora_cfg = _lora_settings(args)
        cfg, _ = _settings(args, None)
    model_path = _model_path(args.model)
    tok_path = args.tokenizer or model_path
    if not os.path.exists(tok_path):
        raise UsageError(f"--tokenizer {tok_path}: no such file or directory")
    tok = Tokenizer.from_pretrained(tok_path)
    data = os.path.abspath(args.data)
    examples, stats = load_sft(data, tok, cfg.seq_len)       # bad data fails before the model is loaded
    train, val = split(examples, args.val_fraction)
    print(f"data: {stats.summary()}; {len(train)} for training, {len(val)} held out", flush=True)
    dtype = args.dtype or (saved or {}).get("dtype", "float32")
    model = Llama.from_pretrained(model_path, dtype=dtype, backend=args.backend)
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: pass the matching --tokenizer")
    if lora_cfg is not None:
        lora.add(model, r=lora_cfg["r"], alpha=lora_cfg["alpha"], targets=lora_cfg["targets"],
                 dropout=lora_cfg["dropout"], rslora=lora_cfg["rslora"], seed=cfg.seed)
    n_train = sum(int(model.params[k].size) for k in model.trainable)
    what = "all" if lora_cfg is None else f"LoRA r={lora_cfg['r']} on {','.join(lora_cfg['targets'])}"
    print(f"model: {model}; training {n_train:,} parameters ({what})", flush=True)
    meta = {"kind": "finetune", "model": args.model, "tokenizer": args.tokenizer, "data": data,
            "val_fraction": args.val_fraction, "full": lora_cfg is None, "lora": lora_cfg}
    trainer = Trainer(model, SFTBatcher(train, cfg.batch_size, seed=cfg.seed), SFTEval(val), cfg, args.out,
                      extra_state={"run": meta}, parallel=train_cli.parallel_for(args, world))
    if args.resume:
        trainer.resume(ck_path)
        print(f"resumed from {ck_path} at step {trainer.step}", flush=True)
    from npllama.train.distributed import examples_fingerprint
    train_cli.agree_on_start(trainer, data=examples_fingerprint(train), validation_data=examples_fingerprint(val))
    code = train_cli.fit_on_ranks(trainer, {"train": asdict(cfg), "dtype": model.dtype.name, "backend": model.backend,
                                            "data_stats": stats_dict(stats), **meta})
    if code or not trainer.is_main:
        return code
    final = os.path.join(args.out, "final")
    if lora_cfg is None:
        model.save_pretrained(final)
        train_cli._copy_tokenizer(tok_path, final)
        jinja = os.path.join(tok_path, "chat_template.jinja")      # where newer transformers keep the template
        if os.path.isdir(tok_path) and os.path.isfile(jinja):
            shutil.copy(jinja, os.path.join(final, "chat_template.jinja"))
        print(f"saved the fine-tuned model to {final}")
    else:
        lora.save(model, final)
        print(f"saved the LoRA adapter to {final} (use it: run.py generate --adapter {final})")
    return 0


__all__ = ["add_arguments", "run"]
