COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_TF32 = 0, 1, 2, 7
_state = {}
def get_compute_type(dtype):
    import numpy as np
    k = np.dtype(dtype).char
    if _state.get(k, 0) == 0:
        _state[k] = COMPUTE_TYPE_DEFAULT
    return _state[k]
def set_compute_type(dtype, ct):
    import numpy as np
    _state[np.dtype(dtype).char] = ct
