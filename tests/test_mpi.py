"""Data parallel training under `mpiexec -n 2` (npllama.train.distributed, npllama.train.zero).

Every run here is a real two-rank MPI job (the mpich wheel's mpiexec), compared with one process
running the same script in float64: the parameters after a few steps of AdamW with clipping and
gradient accumulation must agree to 1e-12 relative, with and without ZeRO-1 and overlap.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py, mpich) runs these tests")

DRIVER = os.path.join(REPO, "tests", "mpi", "driver.py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("NPLLAMA_DEBUG", None)
    env.update(extra)
    return env


def mpi(n, *argv, timeout=120, **kw):
    """Run `mpiexec -n n python argv...`; the completed process (text output)."""
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def solo(*argv, timeout=120):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def params(out):
    from safetensors.numpy import load_file
    return load_file(os.path.join(out, "params.safetensors"))


def rel(a, b):
    """max over tensors of max|a-b| / max|b|."""
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, float64, 4 steps of 2 accumulated micro-batches of 4 rows: tied and untied embeddings."""
    runs = {}
    for untied in (False, True):
        out = str(tmp_path_factory.mktemp("ref"))
        r = solo(DRIVER, out, *(["--untied"] if untied else []))
        assert r.returncode == 0, r.stderr[-2000:]
        runs[untied] = out
    return runs


@pytest.mark.parametrize("zero,overlap,untied", [(0, True, False), (0, False, False), (1, True, False),
                                                 (1, False, True)])
def test_two_ranks_reach_the_parameters_of_one_process(reference, tmp_path, zero, overlap, untied):
    out = str(tmp_path)
    r = mpi(2, DRIVER, out, "--zero", str(zero), *([] if overlap else ["--no-overlap"]),
            *(["--untied"] if untied else []))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ref, got = params(reference[untied]), params(out)
    err = rel(got, ref)
    print(f"zero={zero} overlap={overlap} untied={untied}: max relative difference {err:.2e}")
    assert err <= 1e-12
    # the comparison can fail: the trained parameters moved far from the start
    from npllama.config import LlamaConfig
    import npllama
    sys.path.insert(0, os.path.dirname(DRIVER))
    from driver import CONF
    init = npllama.Llama.init(LlamaConfig(**CONF, tie_word_embeddings=not untied), seed=1, dtype="float64").params
    assert rel(got, {k: np.asarray(v) for k, v in init.items()}) > 1e-3
    # each rank computed only its own rows of the batch the one process drew
    full = np.load(os.path.join(reference[untied], "rows_rank0.npy"))         # (steps*accum, 4, seq)
    for rank in (0, 1):
        mine = np.load(os.path.join(out, f"rows_rank{rank}.npy"))
        assert mine.shape == (full.shape[0], 2, full.shape[2])
        assert np.array_equal(mine, full[:, 2 * rank:2 * rank + 2])
    # progress is logged once (rank 0), with the world size
    assert r.stdout.count("step      4/4") == 1 and "(2 ranks)" in r.stdout
    moments = [json.load(open(os.path.join(out, f"moments_rank{k}.json"))) for k in (0, 1)]
    assert moments[0]["buckets"] >= 3                                  # flat buckets, not one per tensor
    full_bytes = 2 * sum(v.nbytes for v in ref.values())              # exp_avg + exp_avg_sq, one process
    for m in moments:
        if zero:   # each rank holds its half of every bucket (padded to a multiple of the ranks)
            assert full_bytes / 2 <= m["bytes"] <= full_bytes / 2 + 2 * 8 * m["buckets"]
        else:
            assert m["bytes"] == full_bytes


def test_unequal_token_counts_weighted_exactly():
    # rank 0's rows count 4 targets, rank 1's 18 (-100 labels): the gradient of the global mean all the same
    r = mpi(2, os.path.join(REPO, "tests", "mpi", "masked.py"))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("grad rel err") == 2


def test_resume_across_world_sizes(reference, tmp_path):
    """Saved under 2 ranks (ZeRO-1: moments gathered) -> resumed by 1 process, and 1 -> 2: the straight run's result."""
    ref = params(reference[False])
    a = str(tmp_path / "two_to_one")
    r = mpi(2, DRIVER, a, "--zero", "1", "--stop-at", "2", "--save-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    halfway = params(a)
    r = solo(DRIVER, a, "--resume", "--save-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rel(params(a), ref) <= 1e-12
    assert rel(halfway, ref) > 1e-4                  # the first half alone is not the answer
    b = str(tmp_path / "one_to_two")
    r = solo(DRIVER, b, "--stop-at", "2", "--save-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = mpi(2, DRIVER, b, "--resume", "--zero", "1", "--save-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert rel(params(b), ref) <= 1e-12
    # the checkpoint a ZeRO-1 run wrote holds the whole optimizer state in the one-process format
    from npllama.train.checkpoint import latest_checkpoint, load_checkpoint
    ck = load_checkpoint(latest_checkpoint(os.path.join(b, "checkpoints")))
    assert ck["state"]["step"] == 4
    assert set(ck["optimizer"]["state"]) == set(ref)
    for k, v in ref.items():
        assert ck["optimizer"]["state"][k]["exp_avg"].shape == v.shape


# ---------------------------------------------------------------------- the command line and bad input
CONF_CLI = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=61, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture
def cli_files(tmp_path):
    from npllama.train.data import write_token_file
    rng = np.random.default_rng(0)
    toks = ((np.arange(3000) * 5 + rng.integers(0, 2, 3000)) % 61).astype(np.uint16)
    write_token_file(toks, str(tmp_path / "tok.bin"), 61)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONF_CLI, f)
    return ["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "tok.bin"), "--seq-len", "8",
            "--eval-every", "0", "--log-every", "1"]


def errors(r):
    return [line for line in r.stderr.splitlines() if "error" in line]


def test_cli_two_ranks_match_one_process(cli_files, tmp_path):
    common = [*cli_files, "--steps", "3", "--batch-size", "4", "--accum", "2", "--dtype", "float64"]
    one = solo("run.py", "train", *common, "--out", str(tmp_path / "one"))
    two = mpi(2, "run.py", "train", *common, "--out", str(tmp_path / "two"), "--zero", "1")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "data parallel: 2 MPI ranks" in two.stdout and two.stdout.count("saved the trained model") == 1
    from safetensors.numpy import load_file
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert rel(b, a) <= 1e-12


def test_batch_not_divisible_by_ranks(cli_files, tmp_path):
    r = mpi(2, "run.py", "train", *cli_files, "--steps", "2", "--batch-size", "3", "--out", str(tmp_path / "o"),
            timeout=60)
    assert r.returncode == 2
    assert len(errors(r)) == 1, r.stderr
    assert "--batch-size 3" in r.stderr and "2 MPI ranks" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_ranks_with_different_arguments_stop_before_step_one(cli_files, tmp_path):
    base = [sys.executable, "run.py", "train", *cli_files, "--steps", "2", "--batch-size", "2",
            "--out", str(tmp_path / "o")]
    r = subprocess.run([MPIEXEC, "-n", "1", *base, "--lr", "1e-3", ":", "-n", "1", *base, "--lr", "2e-3"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert len(errors(r)) == 1, r.stderr
    assert "MPI ranks disagree on the arguments: rank 1 differs from rank 0" in r.stderr
    assert "step " not in r.stdout and not os.path.exists(tmp_path / "o" / "checkpoints")


def test_disagreement_on_data_or_step_is_named():
    from npllama.train.distributed import DistributedError, check_agreement, tokens_fingerprint

    class TwoRanks:             # rank 1 saw other data: what its allgather would return
        size, rank = 2, 0

        def allgather_obj(self, obj):
            other = dict(obj)
            other["data"] = "0" * 16
            return [obj, other]
    a = np.arange(10000, dtype=np.uint16)
    b = a.copy()
    b[5000] += 1
    assert tokens_fingerprint(a) != tokens_fingerprint(b)       # one token changed in the middle is seen
    with pytest.raises(DistributedError, match="disagree on the data: rank 1"):
        check_agreement(TwoRanks(), start_step=3, data=tokens_fingerprint(a))


def test_mpiexec_without_mpi4py_says_what_to_install(tmp_path, cli_files):
    hide = tmp_path / "hide" / "mpi4py"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('mpi4py hidden by the test')\n")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "run.py", "train", *cli_files, "--steps", "1",
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "hide"), REPO])))
    assert r.returncode == 2
    assert len(errors(r)) == 1, r.stderr
    assert "pip install 'npllama[mpi]'" in r.stderr and "mpi4py is not installed" in r.stderr


def test_killed_rank_ends_the_job_and_the_checkpoint_resumes(reference, tmp_path):
    import psutil
    out = str(tmp_path / "k")
    p = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, DRIVER, out, "--steps", "4", "--save-every", "1",
                          "--sleep", "3"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 60
    while not os.path.exists(latest) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert os.path.exists(latest), "no checkpoint appeared"
    victim = None
    for c in psutil.Process(p.pid).children(recursive=True):
        try:
            if c.environ().get("PMI_RANK") == "1" and "python" in c.name():
                victim = c
        except psutil.Error:
            pass
    assert victim is not None
    t = time.time()
    victim.send_signal(signal.SIGKILL)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("mpiexec still running 60 s after a rank was killed")
    waited = time.time() - t
    print(f"mpiexec exited {waited:.2f} s after rank 1 was killed, code {p.returncode}")
    assert p.returncode != 0 and waited < 60
    from npllama.train.checkpoint import latest_checkpoint
    last = latest_checkpoint(os.path.join(out, "checkpoints"))
    assert not last.endswith("step_000004"), "the run finished before the kill"
    r = solo(DRIVER, out, "--resume", "--steps", "4")        # the last checkpoint resumes, on the same trajectory
    assert r.returncode == 0, r.stderr[-2000:]
    assert rel(params(out), params(reference[False])) <= 1e-12


def test_bad_checkpoint_under_two_ranks_is_one_line_and_left_alone(cli_files, tmp_path):
    out = str(tmp_path / "o")
    common = [*cli_files, "--steps", "2", "--batch-size", "2", "--out", out]
    assert mpi(2, "run.py", "train", *common).returncode == 0
    ck = os.path.join(out, "checkpoints", "step_000002")
    with open(os.path.join(ck, "model.safetensors"), "r+b") as f:   # damaged: shorter than its manifest says
        f.truncate(os.path.getsize(os.path.join(ck, "model.safetensors")) - 8)
    before = {f: os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck)}
    r = mpi(2, "run.py", "train", "--out", out, "--resume", "--steps", "4", timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(errors(r)) == 1, r.stderr
    assert "model.safetensors" in r.stderr
    assert {f: os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck)} == before


def test_cupy_arrays_through_the_ranks(reference, tmp_path):
    """CuPy arrays: with a real CuPy, through NCCL where every rank has a GPU of its own, else through host
    buffers (two ranks on one GPU, or tools/fakecupy, which has no NCCL): the same parameters either way."""
    import importlib.util
    real = importlib.util.find_spec("cupy") is not None
    if not real and shutil.which("g++") is None:
        pytest.skip("the CuPy emulation compiles kernels with g++")
    out = str(tmp_path)
    path = [REPO] if real else [os.path.join(REPO, "tools", "fakecupy"), REPO]
    env = _env(PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, DRIVER, out, "--backend", "cupy", "--zero", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert rel(params(out), params(reference[False])) <= 1e-12


def test_overlap_starts_each_bucket_during_the_backward_from_the_top():
    """In process, a stand-in world of 2 ranks records when each bucket's reduction starts."""
    import npllama
    from npllama.config import LlamaConfig
    from npllama.train.distributed import DataParallel, World
    events = []

    class Recorder(World):
        def __init__(self):
            super().__init__()
            self.size = 2

        def iallreduce_(self, buf):
            events.append(("launch", id(buf)))
            return lambda: None

        def sum(self, x):
            return float(x)
    model = npllama.Llama.init(LlamaConfig(**CONF_CLI), seed=0, dtype="float64")
    inner = model.loss_and_grads

    def spy(ids, targets, on_grads=None, **kw):
        def hook(g):
            events.append(("grads", tuple(g)))
            on_grads(g)
        return inner(ids, targets, on_grads=hook if on_grads else None, **kw)
    model.loss_and_grads = spy
    dp = DataParallel(Recorder(), model, list(model.params), overlap=True, bucket_bytes=4000)
    assert len(dp.buckets) >= 3
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 61, (4, 8))
    for last in (False, True):           # two accumulated micro-batches: only the last one reduces
        dp.loss_and_grads(model, ids, ids, 0.5, last=last)
    launches = [i for i, e in enumerate(events) if e[0] == "launch"]
    grads = [i for i, e in enumerate(events) if e[0] == "grads"]
    assert [e[1] for e in events if e[0] == "launch"] == [id(b.flat) for b in dp.buckets]   # each once, top first
    assert launches[0] < grads[-1]                      # the first bucket went out while layers below remained
    assert launches[0] > grads[len(grads) // 2 - 1]     # ... and not during the first micro-batch
    # the top bucket holds the final norm and the last layer; the embedding comes last
    assert "model.norm.weight" in dp.buckets[0].names and dp.buckets[-1].names[-1] == "model.embed_tokens.weight"
    events.clear()
    off = DataParallel(Recorder(), model, list(model.params), overlap=False, bucket_bytes=4000)
    off.loss_and_grads(model, ids, ids, 1.0, last=True)
    assert [e[0] for e in events] == ["launch"] * len(off.buckets)   # no callbacks: all after the backward


def test_uncaught_exception_on_one_rank_ends_the_job():
    # without MPI_Abort, rank 0 would wait in the barrier forever while rank 1 exits
    code = ("from npllama.train.distributed import World\nw = World.from_env()\n"
            "if w.rank == 1:\n    raise RuntimeError('rank 1 broke')\nw.barrier()\n")
    t = time.time()
    r = mpi(2, "-c", code, timeout=60)
    assert r.returncode != 0 and "rank 1 broke" in r.stderr
    assert time.time() - t < 30


def test_cli_resume_under_two_ranks_and_one(cli_files, tmp_path):
    """`run.py train --resume` from a step-2 checkpoint of a 2-rank ZeRO-1 run, under 2 ranks and under 1."""
    from safetensors.numpy import load_file
    from npllama.train.checkpoint import latest_checkpoint
    out = tmp_path / "full"
    common = [*cli_files, "--steps", "4", "--batch-size", "4", "--save-every", "2", "--dtype", "float64"]
    r = mpi(2, "run.py", "train", *common, "--out", str(out), "--zero", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    want = load_file(str(out / "final" / "model.safetensors"))
    for n in (2, 1):
        cut = tmp_path / f"cut{n}"
        shutil.copytree(out / "checkpoints", cut / "checkpoints")
        shutil.rmtree(cut / "checkpoints" / "step_000004")           # as if stopped after step 2
        (cut / "checkpoints" / "latest").write_text("step_000002\n")
        shutil.copy(out / "history.jsonl", cut / "history.jsonl")
        argv = ["run.py", "train", "--out", str(cut), "--resume"]
        r = mpi(2, *argv) if n == 2 else solo(*argv)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "resumed from" in r.stdout and r.stdout.count("resumed from") == 1
        assert latest_checkpoint(str(cut / "checkpoints")).endswith("step_000004")
        got = load_file(str(cut / "final" / "model.safetensors"))
        assert rel(got, want) <= 1e-12, n


def test_bench_mpi_machinery_on_a_tiny_model(tmp_path):
    r = solo(os.path.join(REPO, "bench", "bench_mpi.py"), "--tiny", "--steps", "1", "--batch", "4", "--seq", "8",
             "--tmp", str(tmp_path / "runs"), "--results", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.load(open(tmp_path / "mpi.json"))
    assert [(x["ranks"], x["overlap"], x["zero"]) for x in rows][2:] == [(2, False, 0), (2, True, 0), (2, True, 0),
                                                                         (2, True, 1)]
    assert all(x["tok_per_s"] > 0 for x in rows) and rows[-1]["buckets"] >= 1


# ---------------------------------------------------------------------- run.py finetune under mpiexec
@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """A tiny random model with SmolLM2's vocabulary and a chat JSONL whose answers differ in length."""
    from npllama.io.defaults import DefaultModelMissing, default_gguf
    from npllama.io.gguf import write_tokenizer_gguf
    from npllama.config import LlamaConfig
    from npllama.model import Llama
    try:
        gguf = default_gguf()
    except DefaultModelMissing as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("ft")
    model = root / "model"
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=49152, max_position_embeddings=64, eos_token_id=2,
                      tie_word_embeddings=True)
    Llama.init(cfg, seed=0, std=0.5).save_pretrained(str(model))
    write_tokenizer_gguf(gguf, str(model / "tokenizer.gguf"))
    r = np.random.default_rng(0)
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(12):
            a, b = (int(v) for v in r.integers(1, 50, 2))
            more = " ".join(["indeed"] * int(r.integers(0, 8)))      # unequal labelled tokens per row
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": f"It is {a + b}. {more}"}]}) + "\n")
    return {"model": str(model), "data": str(root / "chat.jsonl"), "root": root}


def ft_args(ft, out, *more, lora=True):
    adapter = ["--lora-r", "2", "--lora-targets", "q_proj,v_proj,down_proj", "--lora-dropout", "0.1"]
    return ["run.py", "finetune", "--model", ft["model"], "--data", ft["data"], "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--accum", "2", "--seq-len", "56", "--lr", "1e-2", "--dtype", "float64",
            *(adapter if lora else []), "--save-every", "2", "--eval-every", "2", "--eval-batches", "1",
            "--log-every", "1", *more]


def tree(out):
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)


@pytest.fixture(scope="module")
def ft_lora(ft):
    """The same LoRA fine-tuning (dropout, accumulation, eval) by one process and by 2 ranks: {n: (out, stdout)}."""
    runs = {}
    for n in (1, 2):
        out = ft["root"] / f"lora{n}"
        r = solo(*ft_args(ft, out)) if n == 1 else mpi(2, *ft_args(ft, out))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        runs[n] = (out, r.stdout, r.stderr)
    return runs


def test_finetune_lora_two_ranks_match_one_process(ft, ft_lora):
    from safetensors.numpy import load_file
    from npllama import Tokenizer
    from npllama.train.sft import SFTBatcher, load_sft, split
    one, two = (load_file(str(ft_lora[n][0] / "final" / "adapter_model.safetensors")) for n in (1, 2))
    assert set(one) == set(two) and len(one) == 12
    err = rel(two, one)
    print(f"LoRA finetune, 2 ranks vs 1 process: max relative difference {err:.2e}")
    assert err <= 1e-12
    assert min(float(np.abs(v).max()) for k, v in one.items() if "lora_B" in k) > 1e-4   # B starts at 0: it moved
    # the ranks' halves of the global batches count different numbers of labelled targets
    examples, _ = load_sft(ft["data"], Tokenizer.from_pretrained(ft["model"]), 56)
    b = SFTBatcher(split(examples, 0.1)[0], 4, seed=0)
    counts = [(int((y[:2] != -100).sum()), int((y[2:] != -100).sum())) for y in (b.next()[1] for _ in range(8))]
    assert sum(c0 != c1 for c0, c1 in counts) >= 6, counts
    assert "data parallel: 2 MPI ranks" in ft_lora[2][1]


def test_finetune_only_rank_zero_writes_and_prints(ft_lora):
    """One progress log and one 'saved' line (rank 0's), the very files one process writes, its losses."""
    one, (two, out2, err2) = ft_lora[1][0], ft_lora[2]
    assert err2.strip() == "", err2             # rank 1 prints nothing either
    assert out2.count("saved the LoRA adapter") == 1 and out2.count("step      4/4 | loss") == 1
    assert out2.count("data: ") == 1 and out2.count("model: ") == 1
    assert tree(two) == tree(one)              # the same files as one process wrote, and no others
    assert sorted(os.listdir(two / "final")) == ["adapter_config.json", "adapter_model.safetensors"]
    h1 = [json.loads(x) for x in open(one / "history.jsonl")]
    h2 = [json.loads(x) for x in open(two / "history.jsonl")]
    assert [h["step"] for h in h2] == [h["step"] for h in h1]
    for a, b in zip(h1, h2):                   # the logged losses: the global batch's, on rank 0
        for k in ("loss", "val_loss"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-12 * abs(a[k]), (k, a, b)


def test_finetune_lora_checkpoint_of_two_ranks_resumes_in_one_process(ft_lora, tmp_path):
    from safetensors.numpy import load_file
    from npllama.train.checkpoint import latest_checkpoint
    two = ft_lora[2][0]
    cut = tmp_path / "cut"
    shutil.copytree(two / "checkpoints", cut / "checkpoints")
    shutil.rmtree(cut / "checkpoints" / "step_000004")             # as if stopped after step 2
    (cut / "checkpoints" / "latest").write_text("step_000002\n")
    shutil.copy(two / "history.jsonl", cut / "history.jsonl")
    r = solo("run.py", "finetune", "--out", str(cut), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and latest_checkpoint(str(cut / "checkpoints")).endswith("step_000004")
    want = load_file(str(ft_lora[1][0] / "final" / "adapter_model.safetensors"))      # uninterrupted, 1 process
    halfway = load_file(str(cut / "checkpoints" / "step_000002" / "model.safetensors"))
    assert rel(load_file(str(cut / "final" / "adapter_model.safetensors")), want) <= 1e-12
    end = load_file(str(ft_lora[1][0] / "checkpoints" / "step_000004" / "model.safetensors"))
    assert set(halfway) == set(end) and rel(halfway, end) > 1e-4     # the first half alone is not the answer


@pytest.mark.parametrize("zero", [1, 0])
def test_finetune_full_two_ranks_match_one_process(ft, tmp_path, zero):
    from safetensors.numpy import load_file
    full = ["--full", "--lr", "1e-3", "--steps", "2", "--eval-every", "0"]
    one = solo(*ft_args(ft, tmp_path / "one", *full, lora=False))
    two = mpi(2, *ft_args(ft, tmp_path / "two", *full, "--zero", str(zero), lora=False))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("saved the fine-tuned model") == 1 and f"zero={zero}" in two.stdout
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    init = load_file(os.path.join(ft["model"], "model.safetensors"))
    err = rel(b, a)
    print(f"--full --zero {zero}, 2 ranks vs 1 process: max relative difference {err:.2e}")
    assert err <= 1e-12 and rel(a, {k: v.astype(np.float64) for k, v in init.items()}) > 1e-4
    assert tree(tmp_path / "two") == tree(tmp_path / "one")


def test_finetune_batch_not_divisible_by_ranks(ft, tmp_path):
    r = mpi(2, *ft_args(ft, tmp_path / "o", "--batch-size", "3"), timeout=60)
    assert r.returncode == 2
    assert len(errors(r)) == 1, r.stderr
    assert "--batch-size 3" in r.stderr and "2 MPI ranks" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_lora_buckets_hold_the_adapter_alone():
    """Parallel.attach buckets model.trainable only: a LoRA run reduces the adapter's gradients, not the base's."""
    import npllama
    from npllama import lora
    from npllama.config import LlamaConfig
    from npllama.train.distributed import Parallel, World
    from npllama.train.optim import make_optimizer

    class TwoRanks(World):           # a stand-in: collectives are no-ops, the shapes are those of 2 ranks
        def __init__(self):
            super().__init__()
            self.size = 2

        def bcast_(self, buf, root=0):
            pass
    model = npllama.Llama.init(LlamaConfig(**CONF_CLI), seed=0, dtype="float64")
    lora.add(model, r=2, targets=["q_proj", "down_proj"])
    opt = make_optimizer("adamw", {k: p for k, p in model.params.items() if k in model.trainable}, 1e-3, 0.0)
    dp, _ = Parallel(TwoRanks(), bucket_bytes=1000).attach(model, opt, 4)
    names = [n for b in dp.buckets for n in b.names]
    assert sorted(names) == sorted(model.trainable) and len(names) == 8
    assert sum(b.numel for b in dp.buckets) == sum(int(model.params[n].size) for n in model.trainable)


def test_lora_dropout_masks_of_a_rank_are_its_rows_of_the_whole_batch():
    from npllama.layers.lora import Settings, keep_mask
    whole = keep_mask(Settings(1.0, 0.3, np.random.default_rng([5, 7])), (6, 3, 4), np.float64, np)
    mine = keep_mask(Settings(1.0, 0.3, np.random.default_rng([5, 7]), (2, 4, 6)), (2, 3, 4), np.float64, np)
    assert np.array_equal(mine, whole[2:4]) and 0 < (whole == 0).mean() < 1


def test_finetune_ranks_with_different_conversations_stop_before_step_one(ft, tmp_path):
    # the same arguments, but --data (a relative path) names another file on rank 1: its working directory differs
    lines = open(ft["data"]).read().splitlines(keepends=True)
    for rank, first in ((0, lines[0]), (1, lines[0].replace("It is", "It's"))):
        (tmp_path / f"r{rank}").mkdir()
        (tmp_path / f"r{rank}" / "chat.jsonl").write_text(first + "".join(lines[1:]))
    argv = [sys.executable, os.path.join(REPO, "run.py"), *ft_args(ft, "o")[1:]]
    argv[argv.index(ft["data"])] = "chat.jsonl"
    r = subprocess.run([MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "r0"), *argv,
                        ":", "-n", "1", "-wdir", str(tmp_path / "r1"), *argv],
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert len(errors(r)) == 1, r.stderr
    assert "MPI ranks disagree on the data: rank 1 differs from rank 0" in r.stderr
    assert "step " not in r.stdout and not os.path.exists(tmp_path / "r0" / "o" / "checkpoints")


def test_examples_fingerprint_sees_one_label():
    from npllama.train.distributed import examples_fingerprint
    from npllama.train.sft import Example
    a = [Example(np.arange(9), np.array([-100] * 5 + [5, 6, 7, 8])) for _ in range(3)]
    b = [Example(e.ids.copy(), e.labels.copy()) for e in a]
    assert examples_fingerprint(a) == examples_fingerprint(b)
    b[1].labels[5] = -100                      # the same tokens, one label fewer
    assert examples_fingerprint(a) != examples_fingerprint(b)
