"""run_scripts/run_msrun.sh: the msrun command it builds (dry run) and its one-line errors."""
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_scripts" / "run_msrun.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_multi_node_ascend_dry_run():
    proc = run("--workers", "8", "--nodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
               "--master-port", "9000", "--config", "configs/locmoe_128n.yaml", "--device-target", "Ascend",
               "--set", "train.train_steps=32", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "msrun"
    for expected in ("--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=9000",
                     "--node_rank=1", "--join=True"):
        assert expected in words
    tail = words[words.index(str(REPO / "pangu_sigma" / "training" / "train.py")):]
    assert tail[1:] == ["--config", "configs/locmoe_128n.yaml", "--set", "train.train_steps=32", "--set",
                        "parallel.device_target=Ascend"]


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
