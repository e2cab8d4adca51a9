from cupy._core._routines_linalg import get_compute_type, set_compute_type  # noqa
