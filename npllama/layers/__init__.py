"""The reference layers: the textbook math, one file per block, each a pair of pure functions
`forward(...) -> (y, cache)` / `backward(dy, cache) -> gradients`, the cache a NamedTuple holding exactly
what the backward needs. The speed layer (`npllama.fast`) computes the same numbers faster beside them.
"""
