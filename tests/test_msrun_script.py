"""run_scripts/run_msrun.sh: the msrun command it builds (dry run) and its one-line errors."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_scripts" / "run_msrun.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_multi_node_ascend_dry_run():
    proc = run("--workers", "8", "--nodes", "16", "--node-rank", "1", "--master-addr", "10.0.0.1",
               "--master-port", "9000", "--config", "configs/locmoe_128n.yaml", "--device-target", "Ascend",
               "--set", "train.train_steps=32", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:3] == ["cd", str(REPO), "&&"] and words[3].endswith("msrun")  # the module runs from the repository root
    for expected in ("--worker_num=128", "--local_worker_num=8", f"--log_dir={REPO}/output/msrun_logs/node1", "--master_addr=10.0.0.1", "--master_port=9000",
                     "--node_rank=1", "--join=True"):
        assert expected in words
    # issue 10 item 10: a module run (-m), not pangu_sigma/training/train.py as a script
    tail = words[words.index("python"):]
    assert tail == ["python", "-m", "pangu_sigma.training.train", "--paths-from", str(REPO),
                    "--config", str(REPO / "configs" / "locmoe_128n.yaml"), "--set", "train.train_steps=32",
                    "--set", "parallel.device_target=Ascend"]
    assert not any(w.endswith("train.py") for w in words)


def test_module_run_needs_no_editable_install(tmp_path):
    """The msrun workers get PYTHONPATH=<repo>: the trainer module resolves to this checkout from any folder."""
    import os
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    msrun = fake_bin / "msrun"  # stands in for msrun: runs the task command once, as a worker would
    msrun.write_text("#!/usr/bin/env bash\nwhile [ \"$1\" != python ]; do shift; done; shift\n"
                     f"exec {sys.executable} -c 'import sys, pangu_sigma.training.train as t; print(t.__file__)'\n")
    msrun.chmod(0o755)
    env["MSRUN"] = str(msrun)
    proc = subprocess.run(["bash", str(SCRIPT), "--workers", "2", "--config", str(REPO / "configs/cpu_tiny.yaml"),
                           "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(REPO / "pangu_sigma" / "training" / "train.py") in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--workers", "4", "--config", "configs/locmoe_128n.yaml"],
     "parallel.devices_per_node=8 is invalid: 4, the --workers per node"),
    (["--workers", "8", "--config", "configs/locmoe_128n.yaml", "--set", "parallel.devices_per_node=4"],
     "parallel.devices_per_node=4 is invalid: 8"),
    (["--workers", "6", "--config", "configs/locmoe_128n.yaml", "--set", "parallel.devices_per_node=6"],
     "--workers=6 is invalid: 1, 2, 4 or 8"),
    (["--workers", "3", "--config", "configs/cpu_msrun4.yaml"], "parallel.devices_per_node=2 is invalid: a divisor"),
])
def test_workers_must_match_devices_per_node(args, message):
    """Issue 10 item 10: a mismatch mislabels nodes; one line, also in --dry-run."""
    proc = run(*args, "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_node_count_must_match_the_configs_world_size():
    """3 servers of 8 for a config written for 16: one line naming the field and both counts, before msrun."""
    proc = run("--workers", "8", "--nodes", "3", "--master-addr", "10.0.0.1", "--config", "configs/locmoe_128n.yaml",
               "--device-target", "Ascend", "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.world_size=128 is invalid: 24, the device count of --workers 8 x --nodes 3" \
        in lines[0] and "for 16 nodes" in lines[0], proc.stderr


def test_every_trainer_flag_is_passed_and_help():
    proc = run("--workers", "2", "--config", "configs/cpu_tiny.yaml", "--resume", "--allow-config-change",
               "train.gradient_accumulation_steps", "--allow-batch-change", "--set", "train.train_steps=20",
               "--log-dir", "logs", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[words.index("python"):] == [
        "python", "-m", "pangu_sigma.training.train", "--paths-from", str(REPO), "--config",
        str(REPO / "configs" / "cpu_tiny.yaml"), "--resume", "--allow-config-change", "train.gradient_accumulation_steps",
        "--allow-batch-change", "--set", "train.train_steps=20"]
    overwrite = run("--workers", "2", "--config", "configs/cpu_tiny.yaml", "--overwrite", "--dry-run")
    assert overwrite.returncode == 0 and overwrite.stdout.split()[-1] == "--overwrite", overwrite.stderr
    helped = run("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("Multi-process training with msrun")
    for flag in ("--resume", "--overwrite", "--allow-config-change", "--allow-batch-change", "--nodes", "--dry-run"):
        assert flag in helped.stdout


def test_cpu_emulated_nodes_still_launch():
    proc = run("--workers", "4", "--config", "configs/cpu_msrun4.yaml", "--dry-run")  # 2 "nodes" of 2
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0", "--config", "configs/cpu_tiny.yaml"], "--workers='0' is invalid"),
    (["--workers", "2", "--config", "nope.yaml"], "--config='nope.yaml' is invalid"),
    (["--workers", "2", "--config", "configs/cpu_tiny.yaml", "--nodes", "2", "--node-rank", "2"],
     "--node-rank='2' is invalid: 0..1"),
    (["--workers", "2", "--config", "configs/cpu_tiny.yaml", "--master-addr", "host"],
     "--master-addr='host' is invalid"),
    (["--workers", "2", "--config", "configs/cpu_tiny.yaml", "--device-target", "GPU"],
     "--device-target='GPU' is invalid: CPU or Ascend"),
    (["--workers", "2", "--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments_are_one_line(args, message):
    proc = run(*args, "--dry-run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
