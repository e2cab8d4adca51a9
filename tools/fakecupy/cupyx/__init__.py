import numpy as _np
def scatter_add(a, idx, v):
    _np.add.at(a.view(_np.ndarray), _np.asarray(idx), _np.asarray(v))
