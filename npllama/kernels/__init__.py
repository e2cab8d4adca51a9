"""Optional GPU code: fused CUDA kernels for the layers (`cuda`) and CUDA-graph decoding (`decode`).

Importing this package costs nothing; `npllama.kernels.cuda` imports CuPy and is only loaded when a
layer sees a CuPy array with fused kernels enabled (see `npllama.backend.fused_kernels`).
"""
