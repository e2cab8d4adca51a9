"""The command line: generate | chat | eval | convert | train | bench (thin: parses, calls the package).

`python run.py` with no arguments answers a default prompt with the embedded default model
(SmolLM2-135M-Instruct) and prints load time, time to first token and tokens/s.
Errors a user can fix (a bad path, flag or file) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from typing import Any

from npllama.errors import NpllamaError

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
EXIT_USAGE = 2


class UsageError(NpllamaError):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- shared pieces
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="model: an HF dir (config.json + *.safetensors) or a .gguf "
                   "file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or dir (default: the model's)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend (default numpy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype (default float32)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible runs)")


def _sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, metavar="N", help=f"default {max_new}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the output contains TEXT "
                   "(repeatable)")
    p.add_argument("--quiet", action="store_true", help="do not print timings on stderr")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from npllama.generate import Sampling
    try:  # validate before any model is loaded, so a bad flag fails fast
        Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _paths(args: argparse.Namespace, check_only: bool = False) -> tuple[str, str]:
    """(model path, tokenizer path), the embedded default when --model is left out."""
    if args.tokenizer and not os.path.exists(args.tokenizer):
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.model is None:
        if check_only:
            return "", ""
        from npllama.io.defaults import default_model_path
        path = default_model_path()
        return path, args.tokenizer or path
    if not os.path.exists(args.model):
        raise UsageError(f"--model {args.model}: no such file or directory")
    if not os.path.isdir(args.model) and not args.model.endswith(".gguf"):
        raise UsageError(f"--model {args.model}: expected a model directory or a .gguf file")
    return args.model, args.tokenizer or args.model


def _load(args: argparse.Namespace, need_tokenizer: bool = True) -> tuple[Any, Any, float]:
    """(model, tokenizer or None, seconds taken)."""
    t0 = time.perf_counter()
    model_path, tok_path = _paths(args)
    from npllama.model import Llama
    model = Llama.from_pretrained(model_path, dtype=args.dtype, backend=args.backend)
    tok = None
    if need_tokenizer:
        from npllama.tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained(tok_path)
        if tok.vocab_size > model.config.vocab_size:
            raise UsageError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}: pass the matching --tokenizer")
    return model, tok, time.perf_counter() - t0


def _eos_ids(model: Any, tok: Any) -> list[int]:
    ids = list(model.config.eos_token_ids)
    for i in getattr(tok, "eos_ids", []) or []:
        if i not in ids:
            ids.append(i)
    return ids


def _run_stream(model: Any, tok: Any, ids: list[int], args: argparse.Namespace, kw: dict[str, Any],
                out: Any = sys.stdout) -> tuple[str, dict[str, float]]:
    """Stream the continuation of `ids` to `out`; return the text and the timings."""
    from npllama.generate import stream
    times: list[float] = []
    t0 = time.perf_counter()
    pieces = []
    for piece in stream(model, tok, ids, max_new_tokens=args.max_new_tokens, stop=args.stop,
                        eos_ids=_eos_ids(model, tok), on_token=lambda _t: times.append(time.perf_counter()), **kw):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    n = len(times)
    stats = {"prompt_tokens": len(ids), "new_tokens": n,
             "first_token_s": (times[0] - t0) if n else float("nan"),
             "tok_per_s": (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")}
    return "".join(pieces), stats


def _print_stats(load_s: float, stats: dict[str, float]) -> None:
    print(f"[load {load_s:.2f} s | prompt {stats['prompt_tokens']} tokens, first token {stats['first_token_s']:.3f} s"
          f" | {stats['new_tokens']} new tokens, {stats['tok_per_s']:.1f} tok/s]", file=sys.stderr)


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (from --prompt, the positional argument or stdin); --chat wraps it in the chat template."""
    kw = _sampling_kwargs(args)
    _paths(args, check_only=True)  # a bad --model is reported before stdin is read
    prompt = args.prompt if args.prompt is not None else args.text
    if prompt is None:
        if args.default_run or sys.stdin is None or sys.stdin.isatty():
            prompt = DEFAULT_PROMPT
        else:
            prompt = sys.stdin.read()
    if prompt.strip() == "" and not args.chat:
        raise UsageError("the prompt is empty (give --prompt TEXT, a positional prompt, or text on stdin)")
    model, tok, load_s = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        ids = tok.encode(prompt, bos=bool(getattr(tok, "add_bos", False)))
    if args.default_run:
        print(f"> {prompt}", file=sys.stderr)
    _, stats = _run_stream(model, tok, ids, args, kw)
    print()
    if not args.quiet:
        _print_stats(load_s, stats)
    return 0


# ---------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat with history; /reset forgets it, /exit or Ctrl-D leaves. Works through a pipe."""
    kw = _sampling_kwargs(args)
    model, tok, load_s = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[loaded in {load_s:.2f} s; /reset clears the history, /exit or Ctrl-D quits]", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    ctx = model.config.max_position_embeddings
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(system + history, add_generation_prompt=True)
        # forget the oldest turns (never the system prompt) when the context would overflow
        while len(ids) + args.max_new_tokens > ctx and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]
            ids = tok.apply_chat_template(system + history, add_generation_prompt=True)
        if not interactive:
            print(f"> {line}")
        try:
            reply, stats = _run_stream(model, tok, ids, args, kw)
        except ValueError as e:  # e.g. one message longer than the context: say so, keep the session
            print(f"npllama: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply.strip()})
        if args.verbose:
            _print_stats(load_s, stats)


# ---------------------------------------------------------------- eval
def perplexity(model: Any, ids: list[int], context: int) -> tuple[float, float, int]:
    """(perplexity, mean NLL, tokens scored) of `ids`, in non-overlapping windows of `context` tokens."""
    import numpy as np
    from npllama.backend import to_host
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        chunk = ids[start:start + context + 1]
        if len(chunk) < 2:
            break
        x = np.array([chunk[:-1]], dtype=np.int64)
        logits = to_host(model.forward(x))[0].astype(np.float64)            # (T, V)
        m = logits.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        count += len(chunk) - 1
    mean = nll / count
    return math.exp(mean), mean, count


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a text file (non-overlapping windows of --context tokens)."""
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: no such file")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model, tok, load_s = _load(args)
    ids = tok.encode(text, bos=args.bos)
    if args.max_tokens:
        ids = ids[:args.max_tokens + 1]
    if len(ids) < 2:
        raise UsageError(f"{args.file}: needs at least 2 tokens of text")
    context = min(args.context, model.config.max_position_embeddings)
    t0 = time.perf_counter()
    ppl, nll, n = perplexity(model, ids, context)
    print(f"perplexity {ppl:.4f}  (mean NLL {nll:.6f} over {n} tokens, windows of {context}; "
          f"{n / (time.perf_counter() - t0):.0f} tok/s)")
    return 0


# ---------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    """A GGUF (or an HF dir) -> an HF-layout dir: config.json + model.safetensors at --dtype (+ tokenizer.gguf)."""
    from npllama.io.convert import save_hf
    src = args.src
    if src == "default" and not os.path.exists(src):
        from npllama.io.defaults import default_gguf
        src = default_gguf()
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out}: exists and is not a directory")
    t0 = time.perf_counter()
    if src.endswith(".gguf"):
        from npllama.io.gguf import load_gguf
        config, params = load_gguf(src)
    elif os.path.isdir(src):
        from npllama.model import Llama
        m = Llama.from_pretrained(src, dtype="float64" if args.dtype == "float64" else "float32")
        config, params = m.config, m.params
    else:
        raise UsageError(f"{src}: expected a .gguf file or a model directory")
    save_hf(config, params, args.out, args.dtype)
    if src.endswith(".gguf"):  # keep the vocabulary with the weights, so the folder is a complete model
        from npllama.io.gguf import GGUFError, write_tokenizer_gguf
        try:
            write_tokenizer_gguf(src, os.path.join(args.out, "tokenizer.gguf"))
        except GGUFError as e:
            print(f"npllama: note: no tokenizer written ({e})", file=sys.stderr)
    n = sum(int(a.size) for a in params.values())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, {args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------- train / bench
def _train_module() -> Any:
    try:
        from npllama.train import cli as train_cli
    except ImportError:
        return None
    return train_cli if hasattr(train_cli, "add_arguments") and hasattr(train_cli, "run") else None


def cmd_train(args: argparse.Namespace) -> int:
    """Delegates to npllama.train.cli."""
    mod = _train_module()
    if mod is None:
        raise UsageError("training is not available in this build (npllama.train.cli is missing)")
    return int(mod.run(args) or 0)


def _bench_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the scripts in the repository's bench/ folder (all, or the ones named)."""
    d = _bench_dir()
    if not os.path.isdir(d):
        raise UsageError(f"no bench/ folder at {d} (benchmarks live in the source checkout)")
    scripts = sorted(f for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))
    if args.names:
        wanted = [n if n.endswith(".py") else n + ".py" for n in args.names]
        missing = [n for n in wanted if n not in scripts]
        if missing:
            raise UsageError(f"no benchmark {missing[0]!r} in {d} (have: {', '.join(scripts) or 'none'})")
        scripts = wanted
    if not scripts:
        raise UsageError(f"no benchmark scripts in {d}")
    if args.list:
        print("\n".join(scripts))
        return 0
    rc = 0
    for s in scripts:
        print(f"== {s}", flush=True)
        rc = subprocess.call([sys.executable, os.path.join(d, s)] + args.extra) or rc
    return rc


# ---------------------------------------------------------------- parser and entry point
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    ap = _Parser(prog="npllama", description="LLaMA in NumPy/CuPy. With no arguments: answer a default prompt "
                 "with the embedded SmolLM2-135M-Instruct and print load time, first-token time and tokens/s.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,chat,eval,convert,train,bench}", parser_class=_Parser)

    g = sub.add_parser("generate", help="continue a prompt", description=cmd_generate.__doc__)
    g.add_argument("text", nargs="?", help="the prompt (or use --prompt, or pipe it on stdin)")
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    _common(g)
    _sampling(g, 64)
    g.set_defaults(func=cmd_generate, default_run=False)

    c = sub.add_parser("chat", help="interactive chat with history", description=cmd_chat.__doc__)
    c.add_argument("--system", help="system message")
    c.add_argument("--verbose", action="store_true", help="timings after each reply")
    _common(c)
    _sampling(c, 256)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="perplexity of a text file", description=cmd_eval.__doc__)
    e.add_argument("file", help="a UTF-8 text file")
    e.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    e.add_argument("--bos", action="store_true", help="start the text with the BOS token")
    _common(e)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("convert", help="GGUF -> HF-layout safetensors dir", description=cmd_convert.__doc__)
    v.add_argument("src", help="a .gguf file, 'default' (the embedded model's GGUF), or an HF model dir to re-save")
    v.add_argument("out", help="output directory (config.json + model.safetensors)")
    v.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32",
                   help="stored dtype (default float32)")
    v.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train or fine-tune a model", description=cmd_train.__doc__)
    mod = _train_module()
    if mod is not None:
        mod.add_arguments(t)
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="run the benchmarks in bench/", description=cmd_bench.__doc__)
    b.add_argument("names", nargs="*", help="scripts to run (default: all)")
    b.add_argument("--list", action="store_true", help="list the scripts and exit")
    b.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every script")
    b.set_defaults(func=cmd_bench)
    return ap


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'bad input' (a path, a file, a flag value): one line, exit code 2."""
    errs: list[type[BaseException]] = [UsageError, OSError, ValueError, KeyError]
    for mod, name in (("npllama.backend", "BackendError"), ("npllama.tokenizer.errors", "TokenizerError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `run.py` and the `npllama` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    default_run = not argv
    args = parser.parse_args(["generate", "--chat"] if default_run else argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if default_run:
        args.default_run = True
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except _known_errors() as e:
        msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        print(f"npllama: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug, not a user mistake: still one line unless asked for the traceback
        if os.environ.get("NPLLAMA_DEBUG"):
            raise
        print(f"npllama: internal error: {type(e).__name__}: {e} (set NPLLAMA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
