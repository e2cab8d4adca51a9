CUBLAS_DEFAULT_MATH = 0
_mode = {1: 0}
def setMathMode(h, m): _mode[h] = m
def getMathMode(h): return _mode.get(h, 0)
