"""The host allocator policy (npllama.hostmem): a NumPy model's repeated forwards reuse freed memory
instead of faulting in fresh pages each call; NPLLAMA_MALLOC_TUNING=0 leaves glibc as it was."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import npllama

SCRIPT = r"""
import resource, sys, numpy as np, npllama, npllama.hostmem as hm
m = npllama.Llama.from_pretrained(sys.argv[1])
ids = np.random.default_rng(0).integers(0, 1000, (1, 512))
m.forward(ids); m.forward(ids)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
m.forward(ids)
print(hm.keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults(tuning: str, model_dir: str) -> tuple[str, int]:
    env = dict(os.environ, NPLLAMA_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", SCRIPT, model_dir], env=env, capture_output=True, text=True,
                         check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy (Linux)")
def test_forward_reuses_freed_memory_and_the_policy_can_be_turned_off(tmp_path):
    # SmolLM2's layer shapes, 4 layers: loading frees nothing large, so glibc's thresholds start low
    cfg = npllama.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=1000, max_position_embeddings=512)
    npllama.Llama.init(cfg).save_pretrained(str(tmp_path / "m"))
    on, off = _faults("1", str(tmp_path / "m")), _faults("0", str(tmp_path / "m"))
    assert on[0] == "True" and off[0] == "False"
    # untuned, the freed temporaries go back to the kernel and come back as fresh pages on every call
    assert off[1] > 1000, off
    assert on[1] < off[1] / 10, (on, off)
