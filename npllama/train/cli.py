"""`run.py train`: build or load a model, tokenize the data once, train, save the result.

    python run.py train --config config.json --data texts/ --tokenizer tok/ --out runs/x --steps 2000
    python run.py train --out runs/x --resume              # continue exactly where runs/x stopped
    python run.py train --model weights/m --data more.txt --out runs/ft --lr 1e-5   # fine-tune

Writes into --out: data/tokens.bin (+ .json), checkpoints/step_*/ with a `latest` pointer,
history.jsonl, loss.png (with matplotlib), and final/ (an HF-layout model dir, with the tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from typing import Any, Callable

from npllama.cli import UsageError
from npllama.io.atomic import atomic_path
from npllama.train.trainer import TrainConfig, Trainer, TrainingDiverged

# flag -> TrainConfig field, for the settings a resumed run takes from its checkpoint unless given again
_SETTINGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "min_lr": "min_lr",
             "warmup": "warmup", "schedule": "schedule", "clip": "clip", "weight_decay": "weight_decay",
             "accum": "accum", "eval_every": "eval_every", "eval_batches": "eval_batches",
             "save_every": "save_every", "seed": "seed", "optimizer": "optimizer", "beta1": "beta1",
             "beta2": "beta2", "log_every": "log_every", "keep_checkpoints": "keep_checkpoints"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` flags to a parser (settings left out default to TrainConfig's values)."""
    src = parser.add_argument_group("model (one of --config, --model, or --resume)")
    src.add_argument("--config", help="HF config.json of a model to train from scratch")
    src.add_argument("--model", help="pretrained model dir (config.json + safetensors) to fine-tune")
    src.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue from --out's latest checkpoint (or the given checkpoint dir), exactly")
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", help="text file(s) or dir of *.txt, or a token file (.bin with .bin.json)", nargs="+")
    io.add_argument("--tokenizer", help="tokenizer dir/file for text data (default: the --model dir)")
    io.add_argument("--out", required=True, help="output dir: checkpoints, logs, final model")
    io.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out (default 0.1)")
    add_training_arguments(parser)


def add_training_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """The training-setting flags (shared with `finetune`); `defaults` (TrainConfig field -> shown value) for help."""
    d = TrainConfig(**(defaults or {}))
    h = parser.add_argument_group("training (defaults in brackets; a resumed run keeps its saved values)")
    for flag, typ, help_ in (
            ("steps", int, "optimizer steps"), ("batch-size", int, "sequences per micro-batch"),
            ("seq-len", int, "tokens per sequence"), ("accum", int, "micro-batches per optimizer step"),
            ("lr", float, "peak learning rate"), ("min-lr", float, "final learning rate of the cosine decay (lr/10)"),
            ("warmup", int, "linear warmup steps (at most steps/10 unless given)"), ("clip", float, "max global gradient norm (0: off)"),
            ("weight-decay", float, "decoupled weight decay"), ("beta1", float, "AdamW beta1"),
            ("beta2", float, "AdamW beta2"), ("eval-every", int, "validate every N steps (0: off)"),
            ("eval-batches", int, "validation batches per evaluation"),
            ("save-every", int, "checkpoint every N steps (and always at the end)"),
            ("keep-checkpoints", int, "checkpoints kept on disk"), ("log-every", int, "progress line every N steps"),
            ("seed", int, "seed of the data order (and of the init with --config)")):
        h.add_argument("--" + flag, type=typ, default=None, help=f"{help_} [{getattr(d, flag.replace('-', '_'))}]")
    h.add_argument("--schedule", choices=("cosine", "constant"), default=None, help=f"lr schedule [{d.schedule}]")
    h.add_argument("--optimizer", choices=("adamw", "sgd"), default=None, help=f"[{d.optimizer}]")
    h.add_argument("--dtype", choices=("float32", "float64"), default=None, help="compute dtype [float32]")
    h.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend [numpy]")
    mp = parser.add_argument_group("several processes (mpiexec -n N python run.py train ...)")
    mp.add_argument("--zero", type=int, choices=(0, 1), default=0,
                    help="1: shard the optimizer's moments over the ranks (ZeRO-1) [0]")
    mp.add_argument("--no-overlap", action="store_true",
                    help="reduce the gradients after the backward, not during it")
    mp.add_argument("--bucket-mb", type=float, default=25.0, help="MB of gradients per allreduce [25]")


def _settings(args: argparse.Namespace, base: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    d = dict(base) if base else asdict(TrainConfig())
    given = []
    for flag, field_ in _SETTINGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            if base is not None and base.get(field_) != v:
                given.append(f"{field_}={v} (was {base.get(field_)})")
            d[field_] = v
    if base is None and args.min_lr is None:
        d["min_lr"] = d["lr"] / 10                 # the floor follows the peak unless given
    if base is None and args.warmup is None:
        d["warmup"] = min(d["warmup"], d["steps"] // 10)   # a short run is not all warmup
    try:
        return TrainConfig.from_dict(d), given
    except ValueError as e:   # TrainConfig's checks name the setting; the user gave it as --flag
        raise UsageError(f"{e} (--{str(e).split()[0].replace('_', '-')})") from None


def _tokenizer_path(path: str) -> str:
    """--tokenizer as a path: 'default' is the embedded model's GGUF (unless a file of that name exists)."""
    if path == "default" and not os.path.exists(path):
        from npllama.io.defaults import default_gguf
        return default_gguf()
    return path


def _load_tokenizer(path: str) -> Any:
    from npllama.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(_tokenizer_path(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.gguf")


def _copy_tokenizer(src: str, final: str) -> None:
    """Put the tokenizer beside the trained weights, so that `final` is a complete model folder."""
    src = _tokenizer_path(src)
    if os.path.isdir(src):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(final, name))
    elif src.endswith(".gguf"):   # a tokenizer.gguf or a whole model's GGUF: its vocabulary only
        from npllama.io.gguf import write_tokenizer_gguf
        write_tokenizer_gguf(src, os.path.join(final, "tokenizer.gguf"))
    elif os.path.basename(src) in TOKENIZER_FILES:
        shutil.copy(src, os.path.join(final, os.path.basename(src)))


def _tokens(args: argparse.Namespace, vocab_size: int) -> Any:
    """The token file for --data: used as is, or built once from text into <out>/data/tokens.bin."""
    from npllama.train.data import TokenFile, build_token_file, is_token_file, text_files
    if len(args.data) == 1 and is_token_file(args.data[0]):
        tf = TokenFile(args.data[0])
    else:
        files = [os.path.abspath(f) for f in text_files(args.data)]
        out = os.path.join(args.out, "data", "tokens.bin")
        tok_path = args.tokenizer or args.model
        if is_token_file(out) and TokenFile(out).meta.get("sources") == files:
            tf = TokenFile(out)
            print(f"data: reusing {out} ({len(tf):,} tokens)", flush=True)
        else:
            if not tok_path:
                raise UsageError("text --data needs --tokenizer (or a --model dir with a tokenizer)")
            tok = _load_tokenizer(tok_path)
            print(f"data: tokenizing {len(files)} file(s) with {tok_path} ...", flush=True)
            tf = build_token_file(files, tok, out)
            print(f"data: {len(tf):,} tokens -> {out} ({tf.dtype.name})", flush=True)
    if tf.vocab_size > vocab_size:
        raise UsageError(f"{tf.path} was made with a vocabulary of {tf.vocab_size} ids, "
                         f"the model has only {vocab_size}")
    tf.check_ids(vocab_size)
    return tf


def run(args: argparse.Namespace) -> int:
    """Run `train` with parsed arguments; returns the exit code (0 done, 1 diverged); user mistakes raise."""
    return run_on_ranks(args, _run)


# ---------------------------------------------------------------------- one process or the ranks of mpiexec
# `train` and `finetune` share these: run_on_ranks around the command, parallel_for for its Trainer,
# agree_on_start once the Trainer stands (resumed), fit_on_ranks to train; then rank 0 alone saves final/.
def run_on_ranks(args: argparse.Namespace, body: Callable[[argparse.Namespace, Any], int],
                 check: Callable[[argparse.Namespace], None] | None = None) -> int:
    """body(args, world) on one process or on every rank: same arguments everywhere, only rank 0 claims --out and prints.

    check(args) runs first (bad flags are reported before --out is made); under mpiexec a rank's error ends the job."""
    from npllama.train.distributed import check_agreement, cli_world, rank_errors
    from npllama.train.outdir import claim_output
    world = cli_world()               # one process, or the ranks of mpiexec (npllama.train.distributed)
    with rank_errors(world):
        check_agreement(world, arguments={k: v for k, v in vars(args).items() if not callable(v)})
        if check is not None:
            check(args)
        if world.size > 1 and getattr(args, "backend", "numpy") == "cupy":
            world.use_local_gpu()     # before any array is made: one GPU per rank
        if not world.is_main:         # rank 0 owns --out; the others only read it
            return body(args, world)
        with claim_output(args.out):  # one trainer per --out; a second one fails here, naming the folder
            return body(args, world)


def parallel_for(args: argparse.Namespace, world: Any) -> Any:
    """The Trainer's `parallel` from --zero / --no-overlap / --bucket-mb under mpiexec; None in one process."""
    if world is None or world.size == 1:
        return None
    from npllama.train.distributed import Parallel
    return Parallel(world, getattr(args, "zero", 0), not getattr(args, "no_overlap", False),
                    int(getattr(args, "bucket_mb", 25.0) * 2 ** 20))


def agree_on_start(trainer: Trainer, **data: Any) -> None:
    """Under mpiexec: stop before step 1 unless every rank has the same settings, model, data (fingerprints) and step."""
    if trainer.dp is None:
        return
    from npllama.train.distributed import check_agreement, weights_fingerprint
    m, parallel = trainer.model, trainer.dp
    check_agreement(trainer.world, train_config=asdict(trainer.cfg), model_config=m.config.to_dict(),
                    dtype=m.dtype.name, lora=asdict(m.lora) if m.lora is not None else None,
                    frozen_weights=weights_fingerprint(m), start_step=trainer.step, **data)
    print(f"data parallel: {trainer.world.size} MPI ranks, {len(parallel.buckets)} gradient buckets, "
          f"zero={parallel.zero}, overlap={'on' if parallel.overlap else 'off'}", flush=True)


def fit_on_ranks(trainer: Trainer, run_config: dict[str, Any]) -> int:
    """Rank 0 writes <out>/train_config.json; every rank trains; -> 0, or 1 when training diverged (rank 0 says why)."""
    if trainer.is_main:
        with atomic_path(os.path.join(trainer.out_dir, "train_config.json")) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            json.dump(run_config, f, indent=1)
    try:
        trainer.fit()
    except TrainingDiverged as e:
        if trainer.is_main:
            print(f"npllama: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace, world: Any = None) -> int:
    from npllama.config import LlamaConfig
    from npllama.model import Llama
    from npllama.train.checkpoint import latest_checkpoint, load_checkpoint
    # user mistakes raise NpllamaError, which npllama.cli.main reports in one line with exit code 2
    saved = None
    if args.resume:
        path = latest_checkpoint(os.path.join(args.out, "checkpoints")) if args.resume == "latest" else args.resume
        if path is None:
            raise UsageError(f"--resume: no checkpoint under {os.path.join(args.out, 'checkpoints')}")
        saved = load_checkpoint(path)["state"]          # verifies completeness before anything else runs
        run_meta = saved.get("run", {})
        dtype = args.dtype or saved.get("dtype", "float32")
        model = Llama.from_pretrained(path, dtype=dtype, backend=args.backend)
        if not args.data:
            args.data = run_meta.get("data")
        args.tokenizer = args.tokenizer or run_meta.get("tokenizer")
        args.model = args.model or run_meta.get("model")
        cfg, changed = _settings(args, saved["train_config"])
        if changed:
            print("npllama: note: resuming with changed settings (no longer bit-exact): " + ", ".join(changed))
    else:
        if bool(args.config) == bool(args.model):
            raise UsageError("give exactly one of --config (train from scratch) or --model (fine-tune), "
                             "or --resume")
        cfg, _ = _settings(args)
        dtype = args.dtype or "float32"
        if args.config:
            model = Llama.init(LlamaConfig.from_json(args.config), seed=cfg.seed, dtype=dtype, backend=args.backend)
        else:
            model = Llama.from_pretrained(args.model, dtype=dtype, backend=args.backend)
    if not args.data:
        raise UsageError("--data is required")
    if world is None or world.size == 1:
        tf = _tokens(args, model.config.vocab_size)
    else:                             # rank 0 tokenizes text once; the others then read its token file
        tf = _tokens(args, model.config.vocab_size) if world.is_main else None
        world.barrier()
        tf = tf or _tokens(args, model.config.vocab_size)
    train, val = tf.split(args.val_fraction)
    print(f"model: {model}; train {len(train):,} tokens, validation {len(val):,}", flush=True)
    run_meta = {"data": [os.path.abspath(d) for d in args.data], "tokenizer": args.tokenizer, "model": args.model}
    trainer = Trainer(model, train, val, cfg, args.out, extra_state={"run": run_meta},
                      parallel=parallel_for(args, world))
    if args.resume:
        trainer.resume(path)
        print(f"resumed from {path} at step {trainer.step}", flush=True)
    from npllama.train.distributed import tokens_fingerprint
    agree_on_start(trainer, data=tokens_fingerprint(train), validation_data=tokens_fingerprint(val))
    code = fit_on_ranks(trainer, {"train": asdict(cfg), "dtype": model.dtype.name, "backend": model.backend,
                                  **run_meta})
    if code or not trainer.is_main:
        return code
    final = os.path.join(args.out, "final")
    model.save_pretrained(final)
    tok_src = args.tokenizer or args.model
    if tok_src:
        _copy_tokenizer(tok_src, final)
    print(f"saved the trained model to {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: python -m npllama.train.cli ... (the same as `npllama train ...`)."""
    from npllama.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_arguments", "add_training_arguments", "run", "main", "run_on_ranks", "parallel_for", "agree_on_start",
           "fit_on_ranks"]
