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


def hash_dropout_keep(full_shape, rate, seed, site, counter):
    """Keep mask [full_shape] of pangu_sigma.parallel.dropout over a whole GLOBAL tensor, written from the
    scheme's definition in int64 numpy (full coordinate grids, no broadcasting; the seed, site, counter,
    the row-major row index and the column absorbed in turn; 4 Feistel rounds on two 16-bit lanes each)."""
    lane, mult, keys = 1 << 16, 0x6D2B, (0x3C6E, 0x7F4A, 0x1B87, 0x5A31)

    def absorb(a, b, v):
        a, b = (a + v % lane) % lane, (b + v // lane) % lane
        for k in keys:
            p = ((b + k) % lane) * mult
            w = (p // lane) * (p % lane % (1 << 15)) + p % lane
            a, b = b, (a + (w // lane + w) % lane) % lane
        return a, b

    a = np.zeros(full_shape, np.int64)
    b = np.zeros(full_shape, np.int64)
    for value in (seed, site, counter):
        a, b = absorb(a, b, np.int64(value))
    grid = np.indices(full_shape, dtype=np.int64)
    row = np.ravel_multi_index(tuple(grid[:-1]), full_shape[:-1]) if len(full_shape) > 1 else 0
    a, b = absorb(a, b, np.asarray(row, np.int64))
    a, b = absorb(a, b, grid[-1])
    return a * (1 << 15) + b // 2 >= int(round(rate * (1 << 31)))
