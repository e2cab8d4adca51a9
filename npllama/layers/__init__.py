"""One file per block; each is a pair of pure functions `forward -> (y, cache)` / `backward(dy, cache)`."""
