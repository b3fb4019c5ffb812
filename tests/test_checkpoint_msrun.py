"""Checkpoints across layouts under msrun (tests/workers/checkpoint_worker.py), four launches:

1. 4 workers (TP2 x DP2, EP2): run A, 8 steps uninterrupted; run K SIGKILLed after a random step.
2. 4 workers: K resumed, SIGKILLed while writing its next checkpoint (rank 2 halfway through its file).
3. 4 workers: K resumed to step 8.            4. 2 workers (DP2, EP2): A resumed from step 4.
Then A is also resumed from step 4 in one process (posing as DP2, EP2). Checked: the resumes on 2
workers and on 1 process give A's uninterrupted losses for steps 5-8 (<= 1e-5) and A's final
parameters (merged from its 4 ranks); K's losses equal A's bitwise; no partially written step is
used; eval of A's folder = eval of its merge = eval of A on its 4-worker layout under msrun
(pangu_sigma.evaluation.distributed, in the `finish` launch); reshard's TP table = the TP layers' own specs.
Initialisation is layout-independent (the same seed gives the same full model on any layout), so
an uninterrupted 8-step single-process run of the same seed, posing as the 4-worker cluster, is the
reference for every run's losses.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_config
from pangu_sigma.training import checkpoint, checkpoint_tool
from pangu_sigma.training.ckpt_stream import CheckpointReader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "workers"))
import checkpoint_worker as cw  # noqa: E402

VIRTUAL4 = ("parallel.virtual_world_size=4", "parallel.virtual_scope=cluster")
VIRTUAL2 = ("parallel.virtual_world_size=2", "parallel.virtual_scope=cluster")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _msrun(out, data, workers, scenario, *extra):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, GLOG_v="3", PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_dir = out / f"logs_{scenario}"
    cmd = [os.path.join(bindir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True",
           str(REPO / "tests" / "workers" / "checkpoint_worker.py"), str(out), data, scenario, *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                      for p in sorted(Path(log_dir).glob("worker_*.log")))
    return proc.returncode, tails


def _losses(run):
    """{step: loss} from rank 0's log (the last record of a step counts: a resumed run re-logs it)."""
    out = {}
    with open(os.path.join(run, "train_log_rank0.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _done(out, scenario, workers):
    """Every worker of a launch finished (msrun's own exit status also counts its scheduler's
    complaint about workers that skip interpreter teardown, see the worker's last lines)."""
    logs = [(out / f"logs_{scenario}" / f"worker_{r}.log").read_text(errors="replace") for r in range(workers)]
    return all(f"{scenario} done" in text for text in logs)


def launch(out, data):
    """The four msrun launches and the 1-process resume -> status dict (state seen between launches)."""
    from pangu_sigma.training.train import train

    kill_step = random.Random().choice([3, 5])
    status = {"kill_step": kill_step}
    status["first"] = _msrun(out, data, 4, "first", str(kill_step))
    status["after_kill"] = {"complete": checkpoint.complete_steps(str(out / "k"))}
    status["killwrite"] = _msrun(out, data, 4, "killwrite")
    k = str(out / "k")
    status["after_killwrite"] = {
        "complete": checkpoint.complete_steps(k),
        "files": {r: sorted(os.listdir(checkpoint.rank_dir(k, r))) for r in range(4)}}
    status["finish"] = _msrun(out, data, 4, "finish")
    shutil.copytree(out / "a", out / "a2")
    shutil.copytree(out / "a", out / "a1")
    for copy in ("a2", "a1"):  # the step-8 checkpoint never completed: resume from step 4
        os.remove(checkpoint.marker_path(str(out / copy), 8))
    status["two"] = _msrun(out, data, 2, "two")
    lines = []
    one = tiny_run_config(data, str(out / "a1"), cw.TWO + VIRTUAL2 + ("checkpoint.save_steps=4",))
    train(one, resume=True, log=lines.append)
    status["one_log"] = [line for line in lines if "resumed from" in line]
    single = tiny_run_config(data, str(out / "single"), cw.FOUR + VIRTUAL4 + ("checkpoint.save_steps=4",))
    status["single"] = train(single, log=lambda *_: None)["losses"]
    return status


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_msrun")
    return out, launch(out, tiny_data)


@pytest.mark.distributed
def test_resume_on_2_workers_and_on_1_process_continues_the_4_worker_run(runs):
    out, status = runs
    assert os.path.isfile(checkpoint.marker_path(str(out / "a"), 8)), status["first"][1]
    assert _done(out, "two", 2), status["two"][1]
    four, two, one = _losses(str(out / "a")), _losses(str(out / "a2")), _losses(str(out / "a1"))
    assert sorted(four) == list(range(1, 9))
    single = status["single"]  # the uninterrupted single-process run from the same seed
    for step in range(1, 9):
        assert _rel(four[step], single[step]) <= 1e-5, ("4 workers vs 1 process", step, four[step], single[step])
    for step in range(5, 9):
        assert _rel(two[step], single[step]) <= 1e-5, ("2 workers vs 1 process", step, two[step], single[step])
        assert _rel(one[step], single[step]) <= 1e-5, ("1 process resumed", step, one[step], single[step])
        assert _rel(two[step], four[step]) <= 1e-5, ("2 workers", step, two[step], four[step])
        assert _rel(one[step], four[step]) <= 1e-5, ("1 process", step, one[step], four[step])
    assert "resharded from tp=2 ep=2 on 4 ranks" in status["one_log"][0]
    assert checkpoint.latest_complete(str(out / "a2"))[1]["layout"]["world_size"] == 2
    # per-rank -> full: A's 4 ranks merged equal the parameters both resumed runs ended with
    merged = CheckpointReader(str(checkpoint_tool.merge(checkpoint.open_source(str(out / "a")),
                                                        str(out / "a_merged.ckpt"), log=lambda *_: None)))
    for other in ("a1", "a2"):
        ref = checkpoint.open_source(str(out / other))
        assert sorted(merged.names()) == sorted(ref.names(False))
        worst = max((_rel(merged.read(n), ref.full(n)), n) for n in merged.names())
        assert worst[0] <= 5e-5, (other, worst)


@pytest.mark.distributed
def test_kill_at_a_step_and_during_a_save_then_resume_reproduces_the_losses_bitwise(runs):
    out, status = runs
    kill = status["kill_step"]
    assert status["after_kill"]["complete"][-1] == kill - 1
    # killed while saving step kill+1: rank 2's file half written (a temporary), no marker
    after = status["after_killwrite"]
    assert after["complete"][-1] == kill - 1, (after, status["killwrite"][1])
    assert any(name.startswith(".tmp") for name in after["files"][2]), after["files"]
    assert f"step_{kill + 1:08d}.ckpt" in after["files"][0]
    assert _done(out, "finish", 4), status["finish"][1]
    finish_log = (out / "logs_finish" / "worker_0.log").read_text(errors="replace")
    assert f"at step {kill - 1}" in finish_log  # resumed from the last complete step, not the partial one
    a, k = _losses(str(out / "a")), _losses(str(out / "k"))
    assert sorted(k) == list(range(1, 9))
    assert all(k[s] == a[s] for s in range(1, 9)), [(s, k[s], a[s]) for s in range(1, 9)]
    k_dir = str(out / "k")
    assert checkpoint.complete_steps(k_dir) == [6, 8]
    assert not any(name.startswith(".tmp") for r in range(4) for name in os.listdir(checkpoint.rank_dir(k_dir, r)))


@pytest.mark.distributed
def test_eval_of_the_4_worker_folder_equals_eval_of_its_merge_and_tp_table_matches(runs, tmp_path):
    from pangu_sigma.evaluation.eval import evaluate
    from pangu_sigma.parallel.reshard import tp_spec_of

    out, _ = runs
    specs = json.loads((out / "spec.json").read_text())
    assert specs and all(tp_spec_of(name) is not None and [tp_spec_of(name).dim, tp_spec_of(name).parts] == v
                         for name, v in specs.items())
    merged = str(tmp_path / "a.ckpt")
    checkpoint_tool.main(["merge", str(out / "a"), "--output", merged], log=lambda *_: None)
    data = checkpoint.open_source(str(out / "a")).meta["config"]["data"]["dataset_dir"]
    cfg = tiny_run_config(data, str(out / "a"), cw.FOUR + VIRTUAL4 + ("checkpoint.save_steps=4",))
    by_folder = evaluate(cfg, str(out / "a"), batch_size=4, log=lambda *_: None)
    by_merged = evaluate(cfg, merged, batch_size=4, log=lambda *_: None)
    print(f"eval perplexity: run folder {by_folder['perplexity']!r}, merged {by_merged['perplexity']!r}")
    assert by_folder["perplexity"] == by_merged["perplexity"]
    # eval on the training layout: the 4 workers (TP2 x DP2, EP2) of the `finish` launch, each evaluating
    # its DP rank's rows of A, give the single-process eval of A's merged checkpoint (every rank the same)
    for rank in range(4):
        on_cluster = json.loads((out / f"dist_eval_rank{rank}.json").read_text())
        _same_eval_figures(on_cluster, by_merged, rank)


def _same_eval_figures(got, ref, rank):
    assert got["tokens"] == ref["tokens"] and got["routing"]["token_groups"] == ref["routing"]["token_groups"] == 2
    for key in ("ce", "perplexity"):
        assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (rank, key, got[key], ref[key])
    for key in ("expert_load", "dropped", "local", "dropped_remote", "local_by_rank", "load_by_rank"):
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(ref[key], float), rtol=1e-5,
                                   err_msg=f"rank {rank} {key}")
    assert sorted(got["domains"]) == sorted(ref["domains"])
    for name, figures in ref["domains"].items():
        assert got["domains"][name]["tokens"] == figures["tokens"], (rank, name)
        assert not figures["tokens"] or abs(got["domains"][name]["ce"] - figures["ce"]) <= 1e-5 * abs(figures["ce"]), (rank, name)
