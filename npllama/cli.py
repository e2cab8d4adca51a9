"""The command line: generate | chat | eval | convert | train | finetune | bench | explain (thin: parses, calls the package).

`python run.py` with no arguments answers a default prompt with the embedded default model
(SmolLM2-135M-Instruct) and prints load time, time to first token and tokens/s.
Errors a user can fix (an NpllamaError, or an OSError naming a file) print one line on stderr and exit
with code 2; anything else is a bug, reported in one line as an internal error with exit code 1.
Ctrl-C exits with code 130.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from npllama.errors import NpllamaError

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# the install requirements, with what to install when one is missing
_REQUIRED = {"numpy": "numpy", "safetensors": "safetensors", "regex": "regex", "gguf": "gguf"}
SUBCOMMANDS = ("generate", "chat", "eval", "convert", "train", "finetune", "bench", "explain")


class UsageError(NpllamaError):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- numeric flags
def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """An argparse `type=` that accepts finite numbers of `kind` in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        bad = not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or \
            (high is not None and v > high)
        if bad:
            lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
            hi = "" if high is None else f"<= {high:g}"
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'} "
                                             f"{' and '.join(x for x in (lo, hi) if x)}, got {text!r}".rstrip())
        return v
    return parse


# ---------------------------------------------------------------- shared pieces
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="model: an HF dir (config.json + *.safetensors) or a .gguf "
                   "file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or dir, or 'default' for the embedded "
                   "model's vocabulary (default: the model's)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend (default numpy)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype (default float32)")
    p.add_argument("--seed", type=_number(int, 0), default=None, help="random seed for sampling (reproducible runs)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder in PEFT's format (run.py finetune's "
                   "out/final), merged into the weights after loading")


def _sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_number(int, 0), default=max_new, metavar="N", help=f"default {max_new}")
    p.add_argument("--temperature", type=_number(float, 0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_number(int, 1), default=None)
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=None)
    p.add_argument("--min-p", type=_number(float, 0, 1), default=None)
    p.add_argument("--repetition-penalty", type=_number(float, 0, low_open=True), default=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the output contains TEXT "
                   "(repeatable)")
    p.add_argument("--quiet", action="store_true", help="do not print timings on stderr")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from npllama.generate import Sampling
    # validated before any model is loaded, so a bad flag fails fast
    Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _paths(args: argparse.Namespace, check_only: bool = False) -> tuple[str, str]:
    """(model path, tokenizer path), the embedded default when --model is left out."""
    if args.tokenizer == "default" and not os.path.exists(args.tokenizer) and not check_only:
        from npllama.io.defaults import default_gguf
        args.tokenizer = default_gguf()
    if args.tokenizer and args.tokenizer != "default" and not os.path.exists(args.tokenizer):
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file or directory")
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not os.path.isdir(adapter):
        raise UsageError(f"--adapter {adapter}: {'not a directory' if os.path.exists(adapter) else 'no such directory'} "
                         f"(expected a PEFT adapter folder: adapter_config.json + adapter_model.safetensors)")
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
    if getattr(args, "adapter", None):
        from npllama import lora
        lora.load(model, args.adapter)       # checked whole before anything changes: a bad adapter loads nothing
        lora.merge(model)                    # folded into the weights: decoding costs what it did without one
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
                out: Any = None) -> tuple[str, dict[str, float]]:
    """Stream the continuation of `ids` to `out` (stdout); return the text and the timings."""
    from npllama.generate import stream
    out = sys.stdout if out is None else out
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
    parts = [f"load {load_s:.2f} s", f"prompt {stats['prompt_tokens']} tokens"]
    if stats["new_tokens"]:   # no token, no first-token time; one token, no rate
        parts[-1] += f", first token {stats['first_token_s']:.3f} s"
    rate = f", {stats['tok_per_s']:.1f} tok/s" if math.isfinite(stats["tok_per_s"]) else ""
    parts.append(f"{stats['new_tokens']} new tokens{rate}")
    print(f"[{' | '.join(parts)}]", file=sys.stderr)


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (from --prompt, the positional argument or stdin); --chat wraps it in the chat template."""
    kw = _sampling_kwargs(args)
    _paths(args, check_only=True)  # a bad --model is reported before stdin is read
    prompt = args.prompt if args.prompt is not None else args.text
    if prompt is None:
        if args.default_run:
            prompt = DEFAULT_PROMPT
        elif sys.stdin is None or sys.stdin.closed:
            raise UsageError("no prompt: stdin is closed (give --prompt TEXT or a positional prompt)")
        elif sys.stdin.isatty():
            prompt = DEFAULT_PROMPT   # a terminal with nothing piped in: the demo prompt, shown below
        else:
            prompt = sys.stdin.read()   # as it is: a trailing newline is part of the prompt
    if prompt.strip() == "":
        raise UsageError("the prompt is empty (give --prompt TEXT, a positional prompt, or text on stdin)")
    model, tok, load_s = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        ids = tok.encode(prompt, bos=bool(getattr(tok, "add_bos", False)))
    if prompt is DEFAULT_PROMPT:
        print(f"> {prompt}", file=sys.stderr)
    _, stats = _run_stream(model, tok, ids, args, kw)
    print()
    if not args.quiet:
        _print_stats(load_s, stats)
    return 0


# ---------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat with history; /reset forgets it, /exit or Ctrl-D leaves. Works through a pipe."""
    from npllama.generate import PromptTooLong
    kw = _sampling_kwargs(args)
    _paths(args, check_only=True)
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("chat reads its messages from stdin, which is closed")
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
        except PromptTooLong as e:  # one message longer than the context: say so, keep the session
            print(f"npllama: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply.strip()})
        if args.verbose:
            _print_stats(load_s, stats)


# ---------------------------------------------------------------- eval
EVAL_CHUNK = 256   # positions scored per forward call: bounds the (chunk, vocab) logits eval holds at once


def perplexity(model: Any, ids: list[int], context: int, chunk: int = EVAL_CHUNK) -> tuple[float, float, int]:
    """(perplexity, mean NLL, tokens scored) of `ids`, in non-overlapping windows of `context` tokens.

    Each window is fed `chunk` tokens at a time through a KV cache, so memory holds one (chunk, vocab)
    block of logits, not (context, vocab). Non-finite logits are an error naming the token position.
    """
    import numpy as np
    from npllama.backend import to_host
    from npllama.generate import NonFiniteLogits
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start:start + context + 1]
        if len(window) < 2:
            break
        x = np.array([window[:-1]], dtype=np.int64)
        T = x.shape[1]
        cache = model.new_cache(1, T)
        for s in range(0, T, chunk):
            logits = to_host(model.forward(x[:, s:s + chunk], cache=cache, start_pos=s))[0]   # (c, V)
            bad = ~np.isfinite(logits).all(axis=-1)
            if bad.any():
                raise NonFiniteLogits(f"the model gave non-finite logits at token {start + s + int(bad.argmax())}: "
                                      f"its weights hold NaN/inf or its computation overflowed")
            logits = logits.astype(np.float64)
            m = logits.max(axis=-1, keepdims=True)
            logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
            targets = np.asarray(window[s + 1:s + 1 + logits.shape[0]])
            nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += T
    mean = nll / count
    if not math.isfinite(mean):
        raise NonFiniteLogits(f"the mean loss is not finite ({mean})")
    return math.exp(mean), mean, count


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a text file (non-overlapping windows of --context tokens)."""
    _paths(args, check_only=True)
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: {'not a text file' if os.path.exists(args.file) else 'no such file'}")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model, tok, load_s = _load(args)
    ctx = model.config.max_position_embeddings
    if args.context > ctx:
        raise UsageError(f"--context {args.context} is longer than the model's context ({ctx} tokens)")
    ids = tok.encode(text, bos=args.bos)
    if args.max_tokens:
        ids = ids[:args.max_tokens + 1]
    if len(ids) < 2:
        raise UsageError(f"{args.file}: needs at least 2 tokens of text")
    t0 = time.perf_counter()
    ppl, nll, n = perplexity(model, ids, args.context)
    print(f"perplexity {ppl:.4f}  (mean NLL {nll:.6f} over {n} tokens, windows of {args.context}; "
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
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise UsageError(f"{args.out}: the folder is not empty (pass --force to overwrite it)")
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


# ---------------------------------------------------------------- explain
def _check_out_file(flag: str, path: str) -> None:
    """A file the command will write: its folder must exist, and it must not be a folder itself."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory (expected a file name)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")


def cmd_explain(args: argparse.Namespace) -> int:
    """Look inside the model for one prompt: tokens, every attention map, the logit lens, the next token.

    --out writes one self-contained HTML page (nothing fetched); --png an attention map as a picture."""
    from npllama.explain import MAX_TOKENS, explain
    _paths(args, check_only=True)
    if not args.out and not args.png:
        raise UsageError("nothing to write: give --out PAGE.html and/or --png FILE.png")
    if not args.png and (args.layer is not None or args.head is not None):
        raise UsageError("--layer and --head choose the map that --png draws: give --png FILE.png too")
    for flag, path in (("--out", args.out), ("--png", args.png)):
        if path:
            _check_out_file(flag, path)
    if args.prompt.strip() == "":
        raise UsageError("the prompt is empty")
    model, tok, load_s = _load(args)                 # with --adapter loaded and merged
    c = model.config
    layer = c.num_hidden_layers - 1 if args.layer is None else args.layer
    if not 0 <= layer < c.num_hidden_layers:
        raise UsageError(f"--layer {layer}: the model has layers 0..{c.num_hidden_layers - 1}")
    head = 0 if args.head is None else None if args.head == "all" else _head(args.head, c.num_attention_heads)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, bos=bool(getattr(tok, "add_bos", False)))
    t0 = time.perf_counter()
    result = explain(model, tok, ids, max_tokens=MAX_TOKENS)
    result["prompt"] = args.prompt
    took = time.perf_counter() - t0
    from npllama.io.defaults import GGUF_NAME
    name = os.path.basename(os.path.normpath(args.model)) if args.model else GGUF_NAME[:-len(".gguf")]
    if args.adapter:
        name += f" + {os.path.basename(os.path.normpath(args.adapter))}"
    greedy = result["pieces"][str(result["next"]["ids"][0])]
    print(f"{len(ids)} tokens; next token {greedy!r} ({result['next']['probs'][0]:.1%}); explained in {took:.1f} s "
          f"(model loaded in {load_s:.1f} s)", file=sys.stderr)
    if args.out:
        from npllama.explain_html import render
        from npllama.io.atomic import atomic_path
        page = render(result, name).encode("utf-8")
        with atomic_path(args.out, suffix=".html") as tmp:
            with open(tmp, "wb") as f:
                f.write(page)
        print(f"wrote {args.out} ({len(page) / 1e6:.2f} MB)")
    if args.png:
        from npllama.explain_png import save_png
        save_png(result, args.png, layer, head)
        print(f"wrote {args.png} (layer {layer}, {'all heads' if head is None else f'head {head}'})")
    return 0


def _head(text: str, n: int) -> int:
    try:
        h = int(text)
    except ValueError:
        raise UsageError(f"--head {text!r}: expected a head number or 'all'") from None
    if not 0 <= h < n:
        raise UsageError(f"--head {h}: the model has heads 0..{n - 1}")
    return h


# ---------------------------------------------------------------- train / finetune / bench
def cmd_train(args: argparse.Namespace) -> int:
    """Delegates to npllama.train.cli."""
    from npllama.train import cli as train_cli
    return int(train_cli.run(args) or 0)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune on chat data (JSONL, one {"messages": [...]} per line) with a LoRA adapter, or all weights (--full)."""
    from npllama.train import finetune
    return int(finetune.run(args) or 0)


def _bench_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


BENCH_WORKLOADS = ("smollm2", "longctx", "train", "finetune", "tokenizer")   # bench/run_all.py's


def cmd_bench(args: argparse.Namespace) -> int:
    """Run bench/run_all.py (all workloads, or the ones named) from the source checkout."""
    d = _bench_dir()
    if not os.path.isfile(os.path.join(d, "run_all.py")):
        raise UsageError(f"no bench/run_all.py at {d}: the benchmarks live in the source checkout, not the "
                         f"installed package")
    bad = [w for w in args.workloads if w not in BENCH_WORKLOADS]
    if bad:
        raise UsageError(f"no benchmark workload {bad[0]!r} (choose from {', '.join(BENCH_WORKLOADS)})")
    argv = list(args.workloads) + (["--quick"] if args.quick else []) + \
        (["--out", args.out] if args.out else []) + (["--no-retry"] if args.no_retry else [])
    if d not in sys.path:
        sys.path.insert(0, d)   # run_all imports its sibling scripts by name
    import run_all
    return int(run_all.main(argv) or 0)


# ---------------------------------------------------------------- parser and entry point
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    ap = _Parser(prog="npllama", description="LLaMA in NumPy/CuPy. With no arguments: answer a default prompt "
                 "with the embedded SmolLM2-135M-Instruct and print load time, first-token time and tokens/s.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,chat,eval,convert,train,finetune,bench,explain}",
                            parser_class=_Parser)

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
    e.add_argument("--context", type=_number(int, 1), default=512, help="window length in tokens (default 512; "
                   "at most the model's context)")
    e.add_argument("--max-tokens", type=_number(int, 0), default=0, help="score only the first N tokens (0 = all)")
    e.add_argument("--bos", action="store_true", help="start the text with the BOS token")
    _common(e)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("convert", help="GGUF -> HF-layout safetensors dir", description=cmd_convert.__doc__)
    v.add_argument("src", help="a .gguf file, 'default' (the embedded model's GGUF), or an HF model dir to re-save")
    v.add_argument("out", help="output directory (config.json + model.safetensors)")
    v.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32",
                   help="stored dtype (default float32)")
    v.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    v.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train or fine-tune a model", description=cmd_train.__doc__)
    from npllama.train import cli as train_cli
    train_cli.add_arguments(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="fine-tune on chat data (JSONL), with LoRA or --full",
                       description=cmd_finetune.__doc__)
    from npllama.train import finetune
    finetune.add_arguments(f)
    f.set_defaults(func=cmd_finetune)

    b = sub.add_parser("bench", help="run bench/run_all.py (source checkout only)", description=cmd_bench.__doc__)
    b.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help=f"some of {', '.join(BENCH_WORKLOADS)} (default: all)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    b.add_argument("--out", metavar="DIR", help="where the reports go (default bench/results)")
    b.add_argument("--no-retry", action="store_true", help="do not rerun a side disturbed by other processes")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("explain", help="look inside the model for one prompt (HTML page, PNG)",
                       description=cmd_explain.__doc__)
    x.add_argument("prompt", help="the prompt text (at most 64 tokens)")
    x.add_argument("--out", metavar="PAGE.html", help="write the explain page (one self-contained HTML file)")
    x.add_argument("--png", metavar="FILE.png", help="write one attention map as a PNG (needs matplotlib)")
    x.add_argument("--layer", type=_number(int, 0), default=None, help="the layer --png draws (default: the last)")
    x.add_argument("--head", default=None, help="the head --png draws, or 'all' for a grid (default 0)")
    x.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    x.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder, merged into the model first")
    x.add_argument("--model", metavar="PATH", help="model: an HF dir (config.json + *.safetensors) or a .gguf "
                   "file (default: the embedded SmolLM2-135M-Instruct)")
    x.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or dir (default: the model's)")
    x.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend (default numpy)")
    x.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype (default float32)")
    x.set_defaults(func=cmd_explain)
    return ap


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user mistake (exit code 2), or None for a bug."""
    if isinstance(e, NpllamaError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:   # a path the user named: missing, unreadable, full disk
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in _REQUIRED:
        name = e.name.split(".")[0]
        return f"the Python package {name!r} is not installed for {sys.executable}: pip install {_REQUIRED[name]} " \
               f"(or, from the source checkout, pip install -e .)"
    return None


def _no_subcommand(argv: list[str]) -> str | None:
    """A message for options given before (or without) a subcommand, e.g. `npllama --model x`."""
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help") or not argv[0].startswith("-"):
        return None
    return f"{argv[0]} needs a subcommand before it, e.g. npllama generate {' '.join(argv)} " \
           f"(subcommands: {', '.join(SUBCOMMANDS)})"


def _closed_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so that the exit flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of `run.py` and the `npllama` console script."""
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # argparse's --help and usage errors (already printed): the code, for in-process callers
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except BrokenPipeError:
        _closed_stdout()
        print("npllama: error: stdout was closed before the output was written (broken pipe)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        msg = _user_error(e)
        if msg is not None:
            print(f"npllama: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("NPLLAMA_DEBUG"):  # a bug, not a user mistake: one line unless asked for the traceback
            raise
        print(f"npllama: internal error: {type(e).__name__}: {e} (set NPLLAMA_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    if sys.stdout is None or sys.stdout.closed:
        raise UsageError("stdout is closed: npllama writes its results there")
    msg = _no_subcommand(argv)
    if msg:
        raise UsageError(msg)
    parser = build_parser()
    default_run = not argv
    args = parser.parse_args(["generate", "--chat"] if default_run else argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if default_run:
        args.default_run = True
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
