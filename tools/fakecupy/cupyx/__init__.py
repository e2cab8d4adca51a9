import numpy as _np

import cupy as _cp


def scatter_add(a, slices, value):
    """a[slices] += value with repeated indices summed; as in CuPy, index and value arrays may be on the host."""
    if not isinstance(a, _cp.ndarray):
        raise TypeError(f"scatter_add needs a cupy.ndarray, got {type(a)}")
    _cp._run(_np.add.at, (a._a, _cp._unwrap(slices), _cp._unwrap(value)), {})
