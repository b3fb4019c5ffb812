"""hccl_tools / merge_hccl CLIs and the launch scripts, checked through their dry runs."""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "run_scripts"
IPS = {0: "0:192.1.27.6,1:192.2.27.6,2:192.3.27.6,3:192.4.27.6",
       4: "4:192.1.27.7,5:192.2.27.7,6:192.3.27.7,7:192.4.27.7"}
ALL_IPS = f"{IPS[0]},{IPS[4]}"
SECOND_IPS = ALL_IPS.replace(".27.", ".28.")  # the second server's NPU addresses (unique in a table)


def run(cmd, cwd, env=None):
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True)


def run_py_script(name, *args, cwd):
    return run([sys.executable, SCRIPTS / name, *args], cwd)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_MODULES = {name: load_script(name) for name in ("hccl_tools", "merge_hccl")}


@pytest.fixture
def call(capsys, monkeypatch):
    """Run a python tool's main() in this process (fast), in folder `cwd`."""
    def call_main(name, *args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = SCRIPT_MODULES[name].main([str(a) for a in args])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call_main


def assert_one_line_error(result, *texts):
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in texts:
        assert text in result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-server, 16-device merged table and an (empty) config file."""
    folder = tmp_path_factory.mktemp("launch")
    for server, ips in (("10.0.0.1", ALL_IPS), ("10.0.0.2", SECOND_IPS)):
        result = run_py_script("hccl_tools.py", "--server-ip", server, "--device-ips", ips,
                               "--output", f"{server}.json", cwd=folder)
        assert result.returncode == 0, result.stderr
    result = run_py_script("merge_hccl.py", "merged.json", "10.0.0.2.json", "10.0.0.1.json", cwd=folder)
    assert result.returncode == 0, result.stderr
    (folder / "config.yaml").write_text("model: {}\n")
    (folder / "model.ckpt").write_text("")
    return folder


# ---- hccl_tools ------------------------------------------------------------------
@pytest.mark.parametrize("device_range", ["[0,4)", "[4,8)", "[0,8)", "[5,6)"])
def test_hccl_tools_accepts_ranges_inside_an_hccs_group(call, tmp_path, device_range):
    result = call("hccl_tools", "--device-range", device_range, "--server-ip", "10.0.0.1",
                           "--device-ips", ALL_IPS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    start, end = map(int, re.findall(r"\d+", device_range))
    devices = "".join(str(d) for d in range(start, end))
    assert (tmp_path / f"hccl_{end - start}p_{devices}_10.0.0.1.json").is_file()


@pytest.mark.parametrize("device_range", ["[2,6)", "[3,5)", "[0,5)", "[1,8)", "[6,9)", "[4,4)", "0-8",
                                          "[0,3)", "[4,7)", "[0,6)", "[1,8)"])
def test_hccl_tools_refuses_bad_ranges(call, tmp_path, device_range):
    out = tmp_path / "table.json"
    out.write_text("keep me\n")
    result = call("hccl_tools", "--device-range", device_range, "--server-ip", "10.0.0.1",
                           "--device-ips", ALL_IPS, "--output", out, cwd=tmp_path)
    assert_one_line_error(result, "--device-range", repr(device_range))
    assert out.read_text() == "keep me\n"


def test_hccl_tools_only_uses_visible_devices(call, tmp_path):
    """Inside a container that sees NPUs 4-7 (issue 10 item 6): the range must be visible; ids stay physical."""
    result = call("hccl_tools", "--device-range", "[0,4)", "--server-ip", "10.0.0.1", "--device-ips", ALL_IPS,
                  "--visible-devices", "4-7", cwd=tmp_path)
    assert_one_line_error(result, "--device-range", "4-7", "[0, 1, 2, 3]")
    result = call("hccl_tools", "--device-range", "[4,8)", "--server-ip", "10.0.0.1", "--device-ips", ALL_IPS,
                  "--visible-devices", "4-7", "--output", "t.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"device_id": "6"' in (tmp_path / "t.json").read_text()


def test_hccl_tools_reads_hccn_conf(call, tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_4=192.1.27.7\nnetmask_4=255.255.255.0\naddress_5=192.2.27.7\n")
    result = call("hccl_tools", "--device-range", "[4,6)", "--server-ip", "10.0.0.3",
                           "--hccn-conf", conf, "--output", "t.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"device_ip": "192.2.27.7",\n                    "rank_id": "1"' in (tmp_path / "t.json").read_text()


@pytest.mark.parametrize("args,texts", [
    (["--device-range", "[0,4)", "--server-ip", "10.0.0.1", "--device-ips", "0:192.1.27.6"],
     ["--device-ips", "device 1"]),
    (["--server-ip", "10.0.0.1", "--device-ips", "0=192.1.27.6"], ["--device-ips", "'0=192.1.27.6'"]),
    (["--server-ip", "10.0.0.1", "--hccn-conf", "missing.conf"], ["--hccn-conf", "missing.conf"]),
    (["--server-ip", "server-a", "--device-ips", ALL_IPS], ["server_id", "'server-a'"]),
    (["--device-ips", ALL_IPS], ["--server-ip"]),
    (["--server-ip", "10.0.0.1", "--device-ips", ALL_IPS, "--output", "no/such/dir/t.json"], ["no/such/dir"]),
])
def test_hccl_tools_bad_arguments(call, tmp_path, args, texts):
    assert_one_line_error(call("hccl_tools", *args, cwd=tmp_path), *texts)


# ---- merge_hccl --------------------------------------------------------------------
def test_merge_refuses_duplicate_servers_and_keeps_output(call, workdir, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("keep me\n")
    result = call("merge_hccl", out, workdir / "10.0.0.1.json", workdir / "merged.json", cwd=tmp_path)
    assert_one_line_error(result, "server_id", "'10.0.0.1'")
    assert out.read_text() == "keep me\n"


def test_merge_refuses_unequal_device_counts(call, tmp_path):
    """HCCL on 910A: the same device count on every server (issue 10 item 5)."""
    for server, device_range, ips in (("10.0.0.1", "[0,4)", ALL_IPS), ("10.0.0.2", "[0,2)", SECOND_IPS)):
        assert call("hccl_tools", "--device-range", device_range, "--server-ip", server, "--device-ips", ips,
                    "--output", f"{server}.json", cwd=tmp_path).returncode == 0
    result = call("merge_hccl", "m.json", "10.0.0.1.json", "10.0.0.2.json", cwd=tmp_path)
    assert_one_line_error(result, "same device count")
    assert not (tmp_path / "m.json").exists()


def test_merge_names_the_bad_input(call, workdir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text((workdir / "10.0.0.1.json").read_text().replace("completed", "pending"))
    result = call("merge_hccl", tmp_path / "out.json", workdir / "10.0.0.2.json", bad, cwd=tmp_path)
    assert_one_line_error(result, "bad.json", "status", "'pending'")
    assert not (tmp_path / "out.json").exists()


def test_merge_refuses_to_overwrite_an_input(call, workdir):
    result = call("merge_hccl", "10.0.0.1.json", "10.0.0.2.json", "10.0.0.1.json", cwd=workdir)
    assert_one_line_error(result, "OUT", "'10.0.0.1.json'")


# ---- run_distribute_train.sh -----------------------------------------------------
def distribute(workdir, *args, env=None):
    """SERVER_IP: the launching server's address in the table (10.0.0.1 unless the test says otherwise)."""
    return run(["bash", SCRIPTS / "run_distribute_train.sh", *args], workdir, {"SERVER_IP": "10.0.0.1", **(env or {})})


def test_distribute_dry_run_second_server(workdir):
    result = distribute(workdir, "merged.json", "config.yaml", "8", "--dry-run", "--", "--set", "train.train_steps=3",
                        env={"OUTPUT_DIR": "out", "SERVER_IP": "10.0.0.2"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 8 and all("-m pangu_sigma.training.train" in line for line in lines)
    for i, line in enumerate(lines):
        assert line.startswith(f"RANK_ID={8 + i} DEVICE_ID={i} RANK_SIZE=16 RANK_TABLE_FILE={workdir}/merged.json "
                               f"PHYSICAL_DEVICE_ID={i} HCCL_CONNECT_TIMEOUT=600 ")
        assert f"cd {workdir}/out/10.0.0.2/device{i} &&" in line  # per server: no collision on shared storage
        assert line.endswith(f"-m pangu_sigma.training.train --paths-from {workdir} --config {workdir}/config.yaml "
                             "--set parallel.device_target=Ascend --set train.train_steps=3 > log 2>&1")
    assert not (workdir / "out").exists()


def test_distribute_uses_device_ids_from_the_table(call, tmp_path):
    result = call("hccl_tools", "--device-range", "[4,8)", "--server-ip", "10.0.0.1",
                           "--device-ips", IPS[4], "--output", "t.json", cwd=tmp_path)
    assert result.returncode == 0
    (tmp_path / "c.yaml").write_text("parallel: {devices_per_node: 4}\n")
    result = distribute(tmp_path, "t.json", "c.yaml", "0", "4", "--dry-run")
    assert re.findall(r"\bDEVICE_ID=(\d)", result.stdout) == ["4", "5", "6", "7"]
    # a container seeing NPUs 4-7: set_device takes the logical index 0-3 (issue 10 item 6)
    result = distribute(tmp_path, "t.json", "c.yaml", "0", "4", "--dry-run", env={"ASCEND_VISIBLE_DEVICES": "4-7"})
    assert re.findall(r"\bDEVICE_ID=(\d)", result.stdout) == ["0", "1", "2", "3"]
    assert re.findall(r"PHYSICAL_DEVICE_ID=(\d)", result.stdout) == ["4", "5", "6", "7"]
    assert re.findall(r"cd \S+/device(\d) ", result.stdout) == ["4", "5", "6", "7"]
    result = distribute(tmp_path, "t.json", "c.yaml", "0", "4", "--dry-run", env={"ASCEND_VISIBLE_DEVICES": "0-3"})
    assert_one_line_error(result, "--visible-devices", "device 4")


def test_distribute_on_cpu_uses_the_dynamic_cluster(call, tmp_path):
    """DEVICE_TARGET=CPU: the same launch path with MindSpore's scheduler + MS_* variables instead of HCCL."""
    assert call("hccl_tools", "--device-range", "[0,2)", "--server-ip", "127.0.0.1", "--device-ips", ALL_IPS,
                "--output", "t2.json", cwd=tmp_path).returncode == 0
    (tmp_path / "c.yaml").write_text("parallel: {devices_per_node: 2}\n")
    result = distribute(tmp_path, "t2.json", "c.yaml", "0", "2", "--dry-run", env={"DEVICE_TARGET": "CPU"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert (f"MS_SCHED_HOST=127.0.0.1 MS_SCHED_PORT=8119 MS_WORKER_NUM=2 MS_ROLE=MS_WORKER MS_NODE_ID={rank} "
                in line) and "--set parallel.device_target=CPU" in line
    result = distribute(tmp_path, "t2.json", "c.yaml", "0", "1", "--dry-run", env={"DEVICE_TARGET": "CPU"})
    assert_one_line_error(result, "DEVICE_TARGET=CPU runs one server")


@pytest.mark.parametrize("value, ok", [(None, "600"), ("900", "900"), ("60", None), ("abc", None)])
def test_distribute_sets_the_hccl_connect_timeout(workdir, value, ok):
    """Issue 10 item 11: 600 s unless overridden; CANN accepts whole seconds in [120, 7200]."""
    env = {} if value is None else {"HCCL_CONNECT_TIMEOUT": value}
    if value is None:
        env["HCCL_CONNECT_TIMEOUT"] = ""
    result = distribute(workdir, "merged.json", "config.yaml", "0", "--dry-run", env=env)
    if ok is None:
        assert_one_line_error(result, "HCCL_CONNECT_TIMEOUT", repr(value))
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(f"HCCL_CONNECT_TIMEOUT={ok} ") == 8


@pytest.mark.parametrize("args,texts", [
    (["missing.json", "config.yaml"], ["RANK_TABLE_FILE", "missing.json"]),
    (["merged.json", "missing.yaml"], ["CONFIG", "missing.yaml"]),
    (["merged.json", "config.yaml", "-1"], ["-1"]),
    (["merged.json", "config.yaml", "x"], ["RANK_START", "'x'"]),
    (["merged.json", "config.yaml", "0", "9"], ["LOCAL_DEVICE_NUM", "'9'"]),
    (["merged.json", "config.yaml", "0", "0"], ["LOCAL_DEVICE_NUM", "'0'"]),
    (["merged.json", "config.yaml", "0", "3"], ["LOCAL_DEVICE_NUM", "'3'", "1, 2, 4 or 8"]),
    (["merged.json", "config.yaml", "0", "6"], ["LOCAL_DEVICE_NUM", "'6'", "1, 2, 4 or 8"]),
    (["merged.json", "config.yaml", "12"], ["RANK_START", "12 + 8", "16"]),
    (["merged.json", "config.yaml", "4"], ["RANK_START", "span servers"]),
    (["merged.json"], ["usage"]),
    (["merged.json", "config.yaml", "0", "8", "extra"], ["usage"]),
    (["merged.json", "config.yaml", "--bogus"], ["--bogus"]),
    (["config.yaml", "config.yaml"], ["rank_table", "valid JSON", "line 1"]),
])
def test_distribute_bad_arguments(workdir, args, texts):
    assert_one_line_error(distribute(workdir, *args, "--dry-run"), *texts)


def test_distribute_launches_one_process_per_device(tmp_path, workdir):
    """A stand-in python records each trainer's env and arguments in its log."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/usr/bin/env bash
case $2 in pangu_sigma.cluster.ranktable|pangu_sigma.cluster.launch_check) exec {sys.executable} "$@" ;; esac
echo "RANK_ID=$RANK_ID DEVICE_ID=$DEVICE_ID RANK_SIZE=$RANK_SIZE TABLE=$RANK_TABLE_FILE PWD=$PWD HCCL=$HCCL_CONNECT_TIMEOUT ARGS=$*"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = distribute(workdir, "merged.json", "config.yaml", "8", "2", "--", "--seed", "1",
                        env={"PYTHON": str(fake), "OUTPUT_DIR": str(out), "SERVER_IP": "10.0.0.2"})
    assert result.returncode == 0, result.stderr
    assert f"tail -f {out}/10.0.0.2/device0/log" in result.stdout
    logs = [out / "10.0.0.2" / f"device{i}" / "log" for i in range(2)]
    deadline = time.time() + 10
    while not all(log.is_file() and log.read_text().endswith("\n") for log in logs) and time.time() < deadline:
        time.sleep(0.05)
    for i, log in enumerate(logs):
        assert log.read_text() == (
            f"RANK_ID={8 + i} DEVICE_ID={i} RANK_SIZE=16 TABLE={workdir}/merged.json PWD={out}/10.0.0.2/device{i} HCCL=600 "
            f"ARGS=-m pangu_sigma.training.train --paths-from {workdir} --config {workdir}/config.yaml "
            "--set parallel.device_target=Ascend --seed 1\n")


def test_distribute_derives_and_checks_rank_start(workdir):
    """RANK_START from the rank table and the launching host; a wrong one or an unknown host: one line."""
    derived = distribute(workdir, "merged.json", "config.yaml", "--dry-run", env={"SERVER_IP": "10.9.9.9 10.0.0.2"})
    assert derived.returncode == 0, derived.stderr
    assert re.findall(r"^RANK_ID=(\d+) ", derived.stdout, re.M) == [str(r) for r in range(8, 16)]
    assert_one_line_error(distribute(workdir, "merged.json", "config.yaml", "0", "--dry-run",
                                     env={"SERVER_IP": "10.0.0.2"}),
                          "RANK_START=0 is invalid: 8, the first rank of this server 10.0.0.2")
    assert_one_line_error(distribute(workdir, "merged.json", "config.yaml", "--dry-run", env={"SERVER_IP": "10.9.9.9"}),
                          "SERVER_IP='10.9.9.9' is invalid", "10.0.0.1")


@pytest.mark.parametrize("config, texts", [
    ("parallel: {world_size: 32}\n", ["parallel.world_size=32 is invalid: 16, the device count of rank table",
                                      "(2 nodes of 8)", "for 4 nodes"]),
    ("train: {batch_size: 16, global_batch_size: 512}\n",
     ["train.global_batch_size=512 is invalid: 256 = train.batch_size 16 x dp 16"]),
    ("parallel: {devices_per_node: 4}\n", ["parallel.devices_per_node=4 is invalid: 8"]),
])
def test_distribute_refuses_a_config_for_another_cluster(workdir, tmp_path, config, texts):
    (tmp_path / "wrong.yaml").write_text(config)
    assert_one_line_error(distribute(workdir, "merged.json", tmp_path / "wrong.yaml", "--dry-run"), *texts)
    # the trainer's --set after -- is what the check sees too
    fixed = "parallel.world_size=16" if "world_size" in config else None
    if fixed:
        assert distribute(workdir, "merged.json", tmp_path / "wrong.yaml", "--dry-run", "--", "--set",
                          fixed).returncode == 0


# ---- run_standalone_train.sh and run_eval.sh ----------------------------------------
def test_standalone_dry_run(workdir):
    result = run(["bash", SCRIPTS / "run_standalone_train.sh", "config.yaml", "3", "--dry-run", "--", "--x", "a b"],
                 workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"RANK_ID=0 DEVICE_ID=3 RANK_SIZE=1 cd {workdir}/output/standalone_device3 && {sys.executable} "
        f"-m pangu_sigma.training.train --paths-from {workdir} --config {workdir}/config.yaml "
        "--set parallel.device_target=Ascend --x a\\ b > log 2>&1\n")


@pytest.mark.parametrize("args,texts", [
    (["config.yaml", "8"], ["DEVICE_ID", "'8'"]),
    (["nope.yaml", "0"], ["CONFIG", "nope.yaml"]),
    (["config.yaml"], ["usage"]),
])
def test_standalone_bad_arguments(workdir, args, texts):
    result = run(["bash", SCRIPTS / "run_standalone_train.sh", *args, "--dry-run"], workdir)
    assert_one_line_error(result, *texts)


@pytest.mark.parametrize("target_args,target,env", [
    ([], "CPU", ""), (["--device-target", "Ascend"], "Ascend", "DEVICE_ID=0 "),
    (["--device-target=CPU"], "CPU", "")])
def test_eval_dry_run(workdir, target_args, target, env):
    result = run(["bash", SCRIPTS / "run_eval.sh", "config.yaml", "model.ckpt", *target_args, "--dry-run"], workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{env}{sys.executable} -m pangu_sigma.evaluation.eval --config {workdir}/config.yaml "
        f"--checkpoint {workdir}/model.ckpt --set parallel.device_target={target}\n")


@pytest.mark.parametrize("args,texts", [
    (["config.yaml", "model.ckpt", "--device-target", "GPU"], ["--device-target", "'GPU'"]),
    (["config.yaml", "missing.ckpt"], ["CHECKPOINT", "missing.ckpt"]),
    (["config.yaml", "model.ckpt", "--device-target"], ["--device-target"]),
    (["config.yaml"], ["usage"]),
])
def test_eval_bad_arguments(workdir, args, texts):
    result = run(["bash", SCRIPTS / "run_eval.sh", *args, "--dry-run"], workdir)
    assert_one_line_error(result, *texts)
