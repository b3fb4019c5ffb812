"""docs/cluster-guide.md: every block tagged `sh run` runs exactly as written (in order, in one folder) and
succeeds; every `sh run-fails` block fails with a one-line error. Blocks tagged `sh cluster` need servers."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "cluster-guide.md"
BLOCK = re.compile(r"^```sh (run|run-fails|cluster)\n(.*?)^```$", re.M | re.S)


def guide_blocks():
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(GUIDE.read_text())]


def test_every_block_is_tagged():
    fences = re.findall(r"^```(\S*)", GUIDE.read_text(), re.M)
    opening = fences[::2]  # opening and closing fences alternate
    assert opening and all(f in ("sh", "") for f in opening)
    assert len(guide_blocks()) == len(opening)  # every opening fence is a tagged sh block


def test_cpu_commands_of_the_cluster_guide_run_as_written(tmp_path):
    # the guide's folder: the repository's configs and run_scripts, Python on PATH as `python`
    for name in ("configs", "run_scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "GLOG_v": "3"}
    env.pop("SERVER_IP", None)
    ran = {"run": 0, "run-fails": 0}
    for tag, text in guide_blocks():
        if tag == "cluster":
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        if tag == "run":
            assert proc.returncode == 0, f"{text}\n{proc.stderr}"
        else:
            assert proc.returncode != 0 and proc.stdout == "", f"{text}\n{proc.stdout}"
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "is invalid" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
        ran[tag] += 1
    assert ran["run"] >= 4 and ran["run-fails"] >= 2
    # what the guide says the blocks show
    servers = subprocess.run([sys.executable, "-m", "pangu_sigma.cluster.ranktable", "rank_table_128.json",
                              "--servers"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout.splitlines()
    assert servers[1] == "10.0.0.2 RANK_START=8 devices=8" and servers[-1] == "10.0.0.16 RANK_START=120 devices=8"
    assert not (tmp_path / "output").exists()  # dry runs start nothing
