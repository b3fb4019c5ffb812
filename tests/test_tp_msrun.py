"""Tensor parallelism on 2 msrun CPU workers against the single-process model.

One launch: a tiny dense PanGu-Sigma as TP2 (emulated collectives) with the
shards of a single-process model's weights. Checks
- the loss equals the single-process loss;
- gradient semantics: each rank's autodiff gradient is the exact derivative of
  J = sum over ranks of each rank's loss (plain AllReduce, bprop AllReduce; no
  Megatron f/g operators). Summing a replicated parameter's gradient over its TP
  replicas, leaving TP-shards as they are (dp = 1), dividing by the world size
  and gathering the shards gives the single-process gradient dL/dw. Without the
  division the result is world_size x dL/dw, which is checked too.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from locmoe.topology import Topology
from pangu_sigma.model import ModelConfig, PanguSigmaModel, PanguSigmaWithLoss
from pangu_sigma.parallel import TPShard, gather_full_params

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "tp_worker.py"
_spec = importlib.util.spec_from_file_location("tp_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(work_dir):
    """Single-process model with perturbed (non-trivial) weights: saves weights and batch,
    returns (total, ce, {name: grad})."""
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = ModelConfig(**W.MODEL)
    net = PanguSigmaWithLoss(PanguSigmaModel(cfg, None, Topology(world_size=1, num_experts=1, devices_per_node=1)))
    rng = np.random.RandomState(0)
    for p in net.get_parameters():  # non-zero biases / LayerNorm betas so every layout shows in the loss
        value = p.asnumpy() + rng.normal(0.0, 0.05, p.shape).astype(np.float32)
        p.set_data(Tensor(value.astype(np.float32)))
    full = {p.name: p.asnumpy() for p in net.get_parameters()}
    np.savez(work_dir / "full_params.npz", **full)
    ids = rng.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1)).astype(np.int32)
    domains = np.array([0, 1], np.int32)
    np.savez(work_dir / "batch.npz", ids=ids, domains=domains)
    params = net.trainable_params()
    (outputs, grads) = ms.value_and_grad(net, None, params, has_aux=True)(Tensor(ids), Tensor(domains))
    return float(outputs[0]), float(outputs[1]), {p.name: g.asnumpy() for p, g in zip(params, grads)}, full


@pytest.mark.distributed
def test_tp2_loss_and_gradients_match_single_process(tmp_path):
    work, log_dir = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    ref_total, ref_ce, ref_grads, full = _reference(work)

    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, GLOG_v="3", PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [os.path.join(bindir, "msrun"), f"--worker_num={W.WORLD}", f"--local_worker_num={W.WORLD}",
           f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True", str(WORKER), str(work)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tails = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                 for p in sorted(log_dir.glob("*.log"))]
        pytest.fail(f"msrun exited {proc.returncode}\n{proc.stderr[-2000:]}\n" + "\n".join(tails))

    results = [dict(np.load(work / f"rank{r}.npz")) for r in range(W.WORLD)]
    specs = {name: TPShard(*v) for name, v in json.loads((work / "specs.json").read_text()).items()}
    topologies = [Topology(world_size=W.WORLD, tp=2, ep=1, num_experts=1, devices_per_node=2, rank=r)
                  for r in range(W.WORLD)]

    # the layouts the model records: every dense matrix, the embedding table; nothing replicated
    assert specs["model.blocks.0.attn.kv_proj.weight"] == TPShard(1, 2)
    assert specs["model.blocks.0.attn.out_proj.weight"] == TPShard(0)
    assert specs["model.embedding.token_table"] == TPShard(0)
    for name in ("model.embedding.position_table", "model.query_layer.top_query_table",
                 "model.blocks.0.ln_attn.gamma", "model.blocks.0.attn.out_proj.bias"):
        assert name not in specs

    for r, res in enumerate(results):  # every TP rank computes the full loss
        assert abs(float(res["total"]) - ref_total) <= 1e-5 * abs(ref_total), (r, float(res["total"]), ref_total)
        assert abs(float(res["ce"]) - ref_ce) <= 1e-5 * abs(ref_ce)

    names = list(ref_grads)
    raw = [{n: res["grad/" + n] for n in names} for res in results]
    reduced = []  # the reducer: sum over replicas (replicated: both TP ranks; TP shards: only itself), / world
    for r in range(W.WORLD):
        reduced.append({n: (raw[r][n] if n in specs else sum(raw[q][n] for q in range(W.WORLD))) / W.WORLD
                        for n in names})
    got = gather_full_params(reduced, topologies, specs, full_shapes={n: full[n].shape for n in names})
    unscaled = gather_full_params(raw, topologies, specs)
    for n in names:
        ref = ref_grads[n]
        tol = 1e-5 * max(np.abs(ref).max(), 1e-6)
        np.testing.assert_allclose(got[n], ref, rtol=1e-5, atol=tol, err_msg=n)
        if n in specs:  # J = sum of the 2 ranks' losses: a TP shard's raw gradient is 2 x dL/dw
            np.testing.assert_allclose(unscaled[n], W.WORLD * ref, rtol=1e-5, atol=W.WORLD * tol, err_msg=n)
        else:  # replicated: each rank's gradient is partial (only its own branch); the two differ
            np.testing.assert_allclose(raw[0][n] + raw[1][n], W.WORLD * ref, rtol=1e-5, atol=W.WORLD * tol,
                                       err_msg=n)
    # the replicas' partial gradients really differ for a parameter feeding sharded compute (not f/g-synced)
    ln = "model.blocks.0.ln_attn.gamma"
    assert np.abs(raw[0][ln] - raw[1][ln]).max() > 1e-4 * np.abs(ref_grads[ln]).max()
