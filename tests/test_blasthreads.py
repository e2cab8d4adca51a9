"""The BLAS thread policy (npllama.blasthreads): BLAS gets the cores other processes leave free, at model load
and when generate() starts; NPLLAMA_BLAS_THREADS and the user's own *_NUM_THREADS override it."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import npllama
from npllama import blasthreads as bt

pytestmark = pytest.mark.skipif(bt.get_threads() is None, reason="no BLAS npllama can drive (not OpenBLAS)")


@pytest.fixture
def fresh(monkeypatch):
    """A policy with no history, no override in the environment, 2 threads to start; restored afterwards."""
    before, saved = bt.get_threads(), dict(bt._state)
    for k in (bt.ENV,) + bt.USER_ENV:
        monkeypatch.delenv(k, raising=False)
    bt._state.update(cap=None, last_set=None, managed=True)
    bt.set_threads(2)
    yield monkeypatch
    bt._state.update(saved)
    bt.set_threads(before)


def test_choose_counts_the_free_cores():
    assert bt.choose(2, 0.0, 2) == 2
    assert bt.choose(2, 0.4, 2) == 2          # a blip of someone else's work does not halve BLAS
    assert bt.choose(2, 0.6, 2) == 1
    assert bt.choose(2, 1.0, 2) == 1
    assert bt.choose(2, 3.0, 2) == 1          # never below one thread
    assert bt.choose(8, 1.2, 8) == 7
    assert bt.choose(8, 0.0, 4) == 4          # never above what BLAS had
    assert bt.choose(4, None, 4) == 4         # no probe (not Linux): all cores


@pytest.mark.parametrize("use_threadpoolctl", [True, False], ids=["threadpoolctl", "ctypes"])
def test_apply_sets_blas_to_the_free_cores_both_ways(fresh, use_threadpoolctl):
    if not use_threadpoolctl and bt._openblas_lib() is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    fresh.setattr(bt, "cores", lambda: 2)
    fresh.setattr(bt, "other_running", lambda: 1.0)
    assert bt.apply(use_threadpoolctl) == 1
    assert bt.get_threads(True) == bt.get_threads(False) == 1       # both APIs see the one pool
    fresh.setattr(bt, "other_running", lambda: 0.0)
    assert bt.apply(use_threadpoolctl) == 2 and bt.get_threads() == 2


def test_env_overrides(fresh):
    fresh.setattr(bt, "cores", lambda: 2)
    fresh.setattr(bt, "other_running", lambda: 1.0)
    fresh.setenv(bt.ENV, "2")
    assert bt.apply() == 2 and bt.get_threads() == 2                  # forced, whatever the load
    fresh.setenv(bt.ENV, "keep")
    bt.set_threads(2)
    assert bt.apply() is None and bt.get_threads() == 2
    fresh.delenv(bt.ENV)
    fresh.setenv("OPENBLAS_NUM_THREADS", "2")                        # the user's own choice
    assert bt.apply() is None and bt.get_threads() == 2
    for bad in ("0", "two", "-1"):
        fresh.setenv(bt.ENV, bad)
        with pytest.raises(bt.BlasThreadsError, match=f"NPLLAMA_BLAS_THREADS='{bad}'"):
            bt.apply()


def test_a_count_set_by_someone_else_is_left_alone(fresh):
    fresh.setattr(bt, "cores", lambda: 2)
    fresh.setattr(bt, "other_running", lambda: 1.0)
    assert bt.apply() == 1
    bt.set_threads(2)                            # the caller's own threadpoolctl limit, say
    assert bt.apply() is None and bt.get_threads() == 2
    assert bt.apply() is None and bt.get_threads() == 2


def test_model_load_and_generate_apply_the_policy(fresh):
    fresh.setattr(bt, "cores", lambda: 2)
    fresh.setattr(bt, "other_running", lambda: 1.0)
    cfg = npllama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    m = npllama.Llama.init(cfg)
    assert bt.get_threads() == 1                 # at load: one core is taken
    fresh.setattr(bt, "other_running", lambda: 0.0)
    m.generate(np.array([1, 2, 3]), max_new_tokens=2)
    assert bt.get_threads() == 2                 # generate looks again: the machine is free now


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/loadavg")
def test_the_probe_sees_a_competing_process():
    quiet = bt.other_running(samples=20)
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = bt.other_running(samples=20)
    finally:
        p.kill()
        p.wait()
    assert busy >= quiet + 0.5, (quiet, busy)


def test_a_bad_override_is_one_line_and_exit_2_in_the_cli(tmp_path):
    import os
    cfg = npllama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    npllama.Llama.init(cfg).save_pretrained(str(tmp_path / "m"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NPLLAMA_BLAS_THREADS="two", PYTHONPATH=root)
    r = subprocess.run([sys.executable, os.path.join(root, "run.py"), "generate", "--model", str(tmp_path / "m"),
                        "--prompt", "hi"], env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["npllama: error: NPLLAMA_BLAS_THREADS='two': expected a positive "
                                             "integer, 'auto' or 'keep'"]


def test_shared_work_restores_blas_and_reraises_a_workers_error():
    blasthreads = bt
    from npllama.fast import threads
    before = blasthreads.get_threads(use_threadpoolctl=False)
    assert before is not None, "NumPy's OpenBLAS was not found through ctypes"
    blasthreads.set_threads(2, use_threadpoolctl=False)
    try:
        seen = []
        threads.share([lambda: seen.append(blasthreads.get_threads(use_threadpoolctl=False)) for _ in range(4)])
        assert seen == [1, 1, 1, 1] and blasthreads.get_threads(use_threadpoolctl=False) == 2

        def bad():
            raise ValueError("piece 3 failed")
        with pytest.raises(ValueError, match="piece 3 failed"):
            threads.share([lambda: None, bad, lambda: None])
        assert blasthreads.get_threads(use_threadpoolctl=False) == 2     # restored on the error path too
        with blasthreads.split(1) as n:                                  # one piece: nothing to share
            assert n == 1 and blasthreads.get_threads(use_threadpoolctl=False) == 2
        assert [(r.start, r.stop) for r in threads.row_blocks(10, 4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
        assert len(threads.row_blocks(3, 8)) == 3
    finally:
        blasthreads.set_threads(before, use_threadpoolctl=False)
