"""Under mpiexec: ranks with unequal numbers of counted targets (-100 labels) still give the one-process
gradient of the global mean. Every rank computes that reference itself and compares; exit 1 on a mismatch."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import npllama  # noqa: E402
from npllama.config import LlamaConfig  # noqa: E402
from npllama.train.distributed import DataParallel, World  # noqa: E402

from driver import CONF  # noqa: E402

world = World.from_env()
model = npllama.Llama.init(LlamaConfig(**CONF), seed=2, dtype="float64")
rng = np.random.default_rng(0)
ids = rng.integers(0, 61, (4, 9))
targets = rng.integers(0, 61, (4, 9))
targets[:2, :7] = -100          # rows 0-1 (rank 0's): 4 counted targets; rows 2-3 (rank 1's): 18
ref_loss, ref = model.loss_and_grads(ids, targets)
dp = DataParallel(world, model, list(ref), overlap=True, bucket_bytes=10000)
loss, G = dp.loss_and_grads(model, ids, targets, 1.0, last=True)
err = max(float(np.abs(G[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)
# the plain average of the two ranks' means (what equal weights would give) is far off
counted = (targets != -100)
naive = sum(float(model.loss(ids[r], targets[r])) for r in (slice(0, 2), slice(2, 4))) / 2
print(f"rank {world.rank}: loss {loss:.15f} ref {ref_loss:.15f} grad rel err {err:.2e} "
      f"naive loss err {abs(naive - ref_loss):.2e} counted {int(counted[:2].sum())}/{int(counted[2:].sum())}")
ok = err <= 1e-12 and abs(loss - ref_loss) <= 1e-12 * abs(ref_loss) and abs(naive - ref_loss) > 1e-3
sys.exit(0 if ok else 1)
