"""Rank tables: generation (hccl_tools), merging (merge_hccl), validation errors, CLI."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locmoe.errors import ConfigError
from locmoe.topology import Topology
from pangu_sigma.cluster.ranktable import load_rank_table, validate_rank_table_dict, write_rank_table

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "run_scripts"
DEVICE_IPS_A = "0:192.1.27.6,1:192.2.27.6,2:192.3.27.6,3:192.4.27.6"
DEVICE_IPS_B = "4:192.1.27.7,5:192.2.27.7,6:192.3.27.7,7:192.4.27.7"

# Server 10.0.0.10 with devices [0,4) and server 10.0.0.9 with [4,8), merged:
# 10.0.0.9 sorts first as an IPv4 address (not as text), so it gets ranks 0..3.
EXPECTED_MERGED = """{
    "version": "1.0",
    "server_count": "2",
    "server_list": [
        {
            "server_id": "10.0.0.9",
            "device": [
                {
                    "device_id": "4",
                    "device_ip": "192.1.27.7",
                    "rank_id": "0"
                },
                {
                    "device_id": "5",
                    "device_ip": "192.2.27.7",
                    "rank_id": "1"
                },
                {
                    "device_id": "6",
                    "device_ip": "192.3.27.7",
                    "rank_id": "2"
                },
                {
                    "device_id": "7",
                    "device_ip": "192.4.27.7",
                    "rank_id": "3"
                }
            ],
            "host_nic_ip": "reserve"
        },
        {
            "server_id": "10.0.0.10",
            "device": [
                {
                    "device_id": "0",
                    "device_ip": "192.1.27.6",
                    "rank_id": "4"
                },
                {
                    "device_id": "1",
                    "device_ip": "192.2.27.6",
                    "rank_id": "5"
                },
                {
                    "device_id": "2",
                    "device_ip": "192.3.27.6",
                    "rank_id": "6"
                },
                {
                    "device_id": "3",
                    "device_ip": "192.4.27.6",
                    "rank_id": "7"
                }
            ],
            "host_nic_ip": "reserve"
        }
    ],
    "status": "completed"
}
"""


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hccl_tools = load_script("hccl_tools")
merge_hccl = load_script("merge_hccl")


def run_python(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def merged_path(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    assert hccl_tools.main(["--device-range", "[0,4)", "--server-ip", "10.0.0.10",
                            "--device-ips", DEVICE_IPS_A, "--output", str(a)]) == 0
    assert hccl_tools.main(["--device-range", "[4,8)", "--server-ip", "10.0.0.9",
                            "--device-ips", DEVICE_IPS_B, "--output", str(b)]) == 0
    assert merge_hccl.main([str(out), str(a), str(b)]) == 0
    return out


def test_generate_and_merge_is_byte_exact(merged_path):
    assert merged_path.read_text(encoding="utf-8") == EXPECTED_MERGED


def test_loaded_table_feeds_topology(merged_path):
    table = load_rank_table(merged_path, rank_size="8")
    assert table.world_size == 8
    assert table.server_ids == ("10.0.0.9", "10.0.0.10")
    assert table.devices_per_node == 4
    assert table.node_of_rank == (0, 0, 0, 0, 1, 1, 1, 1)
    assert table.device_id_of_rank == (4, 5, 6, 7, 0, 1, 2, 3)
    topo = Topology(world_size=8, tp=4, ep=2, num_experts=2, node_of_rank=table.node_of_rank)
    assert topo.local_experts(rank=5) == [1]


def valid_table():
    def server(ip, first_rank):
        return {"server_id": ip, "host_nic_ip": "reserve",
                "device": [{"device_id": str(d), "device_ip": f"192.{d + 1}.27.{ip[-1]}",
                            "rank_id": str(first_rank + d)} for d in range(4)]}
    return {"version": "1.0", "server_count": "2",
            "server_list": [server("10.0.0.1", 0), server("10.0.0.2", 4)], "status": "completed"}


def edit(change):
    table = copy.deepcopy(valid_table())
    change(table)
    return table


def device(table, server, index):
    return table["server_list"][server]["device"][index]


# (case name, edit of a valid table, text the message must contain: field and value)
BAD_TABLES = [
    ("no status", lambda t: t.pop("status"), ["rank_table.status", "None"]),
    ("no device_ip", lambda t: device(t, 0, 1).pop("device_ip"), ["server 10.0.0.1 device[1].device_ip"]),
    ("no server_id", lambda t: t["server_list"][1].pop("server_id"), ["server_list[1].server_id"]),
    ("dup device id", lambda t: device(t, 1, 2).update(device_id="0"),
     ["server 10.0.0.2 device[2].device_id", "'0'", "unique within its server"]),
    ("dup rank id", lambda t: device(t, 1, 0).update(rank_id="2"),
     ["server 10.0.0.2 device[0].rank_id", "'2'", "server 10.0.0.1 device[2]"]),
    ("rank gap", lambda t: device(t, 1, 3).update(rank_id="9"),
     ["server 10.0.0.2 device[3].rank_id", "'9'", "0..7", "missing [7]"]),
    ("rank not a number", lambda t: device(t, 0, 0).update(rank_id="r0"), ["device[0].rank_id", "'r0'"]),
    ("rank as int", lambda t: device(t, 0, 0).update(rank_id=0), ["device[0].rank_id", "=0 ", "string"]),
    ("bad device ip", lambda t: device(t, 0, 3).update(device_ip="192.1.27"),
     ["server 10.0.0.1 device[3].device_ip", "'192.1.27'", "IPv4"]),
    ("device ip out of range", lambda t: device(t, 0, 3).update(device_ip="192.1.27.300"),
     ["device[3].device_ip", "'192.1.27.300'"]),
    ("dup device ip in a server", lambda t: device(t, 0, 3).update(device_ip="192.1.27.1"),
     ["server 10.0.0.1 device[3].device_ip", "'192.1.27.1'", "unique across the table", "server 10.0.0.1 device[0]"]),
    ("dup device ip across servers", lambda t: device(t, 1, 2).update(device_ip="192.3.27.1"),
     ["server 10.0.0.2 device[2].device_ip", "'192.3.27.1'", "server 10.0.0.1 device[2] has it too"]),
    ("bad server id", lambda t: t["server_list"][0].update(server_id="node-1"),
     ["server_list[0].server_id", "'node-1'", "IPv4"]),
    ("dup server id", lambda t: t["server_list"][1].update(server_id="10.0.0.1"),
     ["server_list[1].server_id", "'10.0.0.1'", "unique"]),
    ("device id too big", lambda t: device(t, 0, 0).update(device_id="8"), ["device[0].device_id", "'8'", "0..7"]),
    ("server_count", lambda t: t.update(server_count="3"), ["server_count", "'3'", '"2"']),
    ("server_count int", lambda t: t.update(server_count=2), ["server_count", "=2 ", "string"]),
    ("status", lambda t: t.update(status="initializing"), ["status", "'initializing'", '"completed"']),
    ("version", lambda t: t.update(version="2.0"), ["version", "'2.0'", '"1.0"']),
    ("empty servers", lambda t: t.update(server_list=[]), ["server_list", "non-empty"]),
    ("empty devices", lambda t: t["server_list"][0].update(device=[]), ["server 10.0.0.1 device", "non-empty"]),
]


@pytest.mark.parametrize("name,change,expected", BAD_TABLES, ids=[c[0] for c in BAD_TABLES])
def test_bad_table_is_named_in_one_line(tmp_path, name, change, expected):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(edit(change)))
    with pytest.raises(ConfigError) as err:
        load_rank_table(path)
    message = str(err.value)
    assert "\n" not in message
    for text in expected:
        assert text in message


def test_valid_table_passes():
    assert validate_rank_table_dict(valid_table()).world_size == 8


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"rank_table=.*nope\.json.*no such file"):
        load_rank_table(tmp_path / "nope.json")


def test_malformed_json_gives_line_and_column(tmp_path):
    path = tmp_path / "table.json"
    path.write_text('{\n  "version": "1.0",\n  "server_count" "2"\n}\n')
    with pytest.raises(ConfigError) as err:
        load_rank_table(path)
    assert "line 3 column 18" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rank_size", [4, "16", "eight"])
def test_rank_size_must_match(tmp_path, rank_size):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(valid_table()))
    with pytest.raises(ConfigError) as err:
        load_rank_table(path, rank_size=rank_size)
    assert f"RANK_SIZE={rank_size!r}" in str(err.value) and "8 devices" in str(err.value)


def test_cli_summary_and_errors(merged_path, tmp_path):
    ok = run_python("-m", "pangu_sigma.cluster.ranktable", merged_path, "--rank-size", "8")
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1
    assert "8 devices on 2 server(s)" in ok.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(lambda t: t.update(status="pending"))))
    for args in ([bad], [merged_path, "--rank-size", "16"], [tmp_path / "none.json"], [merged_path, "--nope"]):
        result = run_python("-m", "pangu_sigma.cluster.ranktable", *args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_cli_local_ranks(merged_path):
    result = run_python("-m", "pangu_sigma.cluster.ranktable", merged_path, "--local-ranks", "4", "4")
    assert result.stdout.split() == ["8", "0", "1", "2", "3"]
    spanning = run_python("-m", "pangu_sigma.cluster.ranktable", merged_path, "--local-ranks", "2", "4")
    assert spanning.returncode == 2 and "span servers" in spanning.stderr


def test_no_mindspore_import():
    code = "import sys, pangu_sigma.cluster.ranktable; print('mindspore' in sys.modules)"
    assert run_python("-c", code).stdout.strip() == "False"


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text("old contents\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_rank_table(path, valid_table())
    assert path.read_text() == "old contents\n"
    assert os.listdir(tmp_path) == ["table.json"]


def test_invalid_table_is_never_written(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("old contents\n")
    with pytest.raises(ConfigError):
        write_rank_table(path, edit(lambda t: t.update(status="pending")))
    assert path.read_text() == "old contents\n"
