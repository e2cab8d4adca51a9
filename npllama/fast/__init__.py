"""The speed layer, beside the reference layers in `npllama.layers`: the same functions with the same
results, computed faster.

- `storage`: each layer's q/k/v (and gate/up) weights as row blocks of one matrix behind HF-named views,
  so one product does three (or two);
- `attention`: K/V heads shared instead of repeated, queries in blocks, the softmax in place;
- `mlp`, `linear`: the stacked products and their backward;
- `rmsnorm`, `rope`, `loss`: fewer passes and temporaries;
- `cuda`: fused CUDA kernels (CuPy only); `decode`: a single-token step captured as a CUDA graph.
- `ops`: how the model calls them (`FastOps`, beside `npllama.transformer.ReferenceOps`).

Every function here is tested equal to its reference in float64 (tests/test_fast_vs_reference.py).
"""
