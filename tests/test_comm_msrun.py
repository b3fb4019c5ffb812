"""Emulated collectives on 4 msrun CPU workers: values and gradients against numpy."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "comm_worker.py"
_spec = importlib.util.spec_from_file_location("comm_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
WORLD = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunks(a, dim, g):
    return np.split(a, g, axis=dim)


def reference(case, rank):
    """(out, grad) for `rank`: grad is d(sum_j sum(out_j * w_j)) / d x_rank."""
    kind, _, kw, _ = W.CASES[case]
    group = W.group_of(case, rank)
    g, i = len(group), group.index(rank)
    xs = [W.make_input(case, r) for r in group]
    ws = [W.make_weight(case, r) for r in group]
    if kind == "all_to_all":  # out_i = concat_j chunk_i(x_j); grad_i = concat_j chunk_i(w_j): the inverse
        s, c = kw["split_dim"], kw["concat_dim"]
        out = np.concatenate([_chunks(x, s, g)[i] for x in xs], axis=c)
        grad = np.concatenate([_chunks(w, c, g)[i] for w in ws], axis=s)
    elif kind == "all_to_all_v":  # out_i = source by source, the blocks j sent to i; grad: the same way back
        blocks = kw["blocks"]
        sent = lambda a, j, k: a[sum(blocks[j][:k]):sum(blocks[j][:k + 1])]  # blocks j sends k, from j's array
        got = lambda a, k, j: a[sum(row[k] for row in blocks[:j]):sum(row[k] for row in blocks[:j + 1])]
        out = np.concatenate([sent(x, j, i) for j, x in enumerate(xs)])
        grad = np.concatenate([got(w, k, i) for k, w in enumerate(ws)])
    elif kind == "all_gather":
        out = np.concatenate(xs, axis=kw["dim"])
        grad = sum(_chunks(w, kw["dim"], g)[i] for w in ws)
    elif kind == "reduce_scatter":
        out = _chunks(sum(xs), kw["dim"], g)[i]
        grad = np.concatenate(ws, axis=kw["dim"])
    else:
        out, grad = sum(xs), sum(ws)
    return out, grad


@pytest.mark.distributed
def test_emulated_collectives_msrun(tmp_path):
    out_dir, log_dir = tmp_path / "out", tmp_path / "logs"
    out_dir.mkdir()
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, GLOG_v="3", PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [os.path.join(bindir, "msrun"), f"--worker_num={WORLD}", f"--local_worker_num={WORLD}",
           f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True", str(WORKER), str(out_dir)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tails = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                 for p in sorted(log_dir.glob("*.log"))]
        pytest.fail(f"msrun exited {proc.returncode}\n{proc.stderr[-2000:]}\n" + "\n".join(tails))
    for case in W.CASES:
        for rank in range(WORLD):
            want_out, want_grad = reference(case, rank)
            got_out = np.load(out_dir / f"out_{case}_{rank}.npy")
            got_grad = np.load(out_dir / f"grad_{case}_{rank}.npy")
            np.testing.assert_allclose(got_out, want_out, rtol=1e-6, err_msg=f"{case} rank {rank} value")
            np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{case} rank {rank} grad")
