"""Run every CPU benchmark and write one combined report (what `python run.py bench` calls).

    python bench/run_all.py                      # everything, default sizes
    python bench/run_all.py smollm2 train        # some workloads: smollm2, longctx, train, finetune, tokenizer
    python bench/run_all.py --quick              # fewer repetitions (a rough look, minutes not tens)
    python bench/run_all.py --out DIR            # where the .json / .md files go (default bench/results)

Each workload script runs its sides (npllama, PyTorch, llama.cpp) in separate processes and writes
<workload>.json and .md; this driver adds all.md / all.json with every table. The tokenizer
workload runs bench/bench_tokenizer.py as it is, in a child process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WORKLOADS = ("smollm2", "longctx", "train", "finetune", "tokenizer")


def main(argv: list[str] | None = None) -> int:
    """Run the named workloads (default: all) and write the combined report; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workloads", nargs="*", choices=[*WORKLOADS, []], help="default: all")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-retry", action="store_true", help="do not rerun a side disturbed by other processes")
    a = ap.parse_args(argv)
    todo = a.workloads or list(WORKLOADS)
    out = a.out or os.path.join(C.ROOT, "bench", "results")
    extra = ["--out", out] + (["--no-retry"] if a.no_retry else [])
    sections, data = [], {"machine": C.machine_info()}
    if "smollm2" in todo:
        import bench_smollm2
        args = extra + (["--reps", "2", "--load-reps", "1", "--new-tokens", "64"] if a.quick else [])
        d = bench_smollm2.main(args)
        data["smollm2"] = d
        sections.append(open(os.path.join(out, "smollm2.md")).read())
    if "longctx" in todo:
        import bench_longctx
        args = extra + (["--lengths", "1024,2048", "--reps", "1"] if a.quick else [])
        data["longctx"] = bench_longctx.main(args)
        sections.append(open(os.path.join(out, "longctx.md")).read())
    if "train" in todo:
        import bench_train_step
        args = extra + (["--steps", "2"] if a.quick else [])
        data["train"] = bench_train_step.main(args)
        sections.append(open(os.path.join(out, "train_step.md")).read())
    if "finetune" in todo:
        import bench_finetune
        args = extra + (["--steps", "2"] if a.quick else [])
        data["finetune"] = bench_finetune.main(args)
        sections.append(open(os.path.join(out, "finetune.md")).read())
    if "tokenizer" in todo:
        script = os.path.join(C.ROOT, "bench", "bench_tokenizer.py")
        env = dict(os.environ, PYTHONPATH=C.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        targs = ["--repeats", "2", "--mb", "0.2"] if a.quick else []
        if os.environ.get("NPLLAMA_BENCH_TINY"):      # the smoke test: machinery only
            targs = ["--repeats", "1", "--mb", "0.01"]
        p = subprocess.run([sys.executable, script] + targs, capture_output=True, text=True, env=env)
        text = p.stdout.strip() if p.returncode == 0 else f"bench_tokenizer.py failed (exit {p.returncode}): " \
            + (p.stderr or p.stdout).strip()[-800:]
        print(text)
        data["tokenizer"] = {"output": text, "returncode": p.returncode}
        sections.append("### Tokenizer encode (bench/bench_tokenizer.py)\n\n" + text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "all.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "all.md"), "w") as f:
        f.write("\n\n".join(s.strip() for s in sections) + "\n")
    print(f"\n(combined report: {os.path.join(out, 'all.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
