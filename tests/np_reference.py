"""Independent numpy references shared by the locmoe tests (written from the paper, not the code)."""
import numpy as np


def eq4_weight(n, d):
    """omega_i = n/d * 1{i d/n <= j < (i+1) d/n}, written literally from eq. 4."""
    w = np.zeros((n, d), np.float64)
    j = np.arange(d)
    for i in range(n):
        w[i] = (n / d) * ((i * d / n <= j) & (j < (i + 1) * d / n))
    return w


def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
