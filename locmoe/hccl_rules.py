"""HCCL rules for communication groups on Ascend 910A servers (Atlas training series), checked in Python.

From CANN's HCCL Python API reference, `create_group(group, rank_num, rank_ids)`
("HCCL API Reference > create_group", Atlas training series), and the CANN
TensorFlow migration guide ("Precautions" before distributed training):
- within one server a group uses 1, 2, 4 or 8 devices;
- a group spanning servers uses the same number of devices on every server;
- with 2 or 4 devices on a server they lie in one HCCS half: devices 0-3
  and devices 4-7 are separate networks;
- the group name is a string of at most 128 bytes including the terminating
  NUL, i.e. at most 127 bytes of name.
The same rules apply to the whole job (the world group), i.e. to rank tables.
Every failure is a one-line ConfigError naming the group, before any HCCL call.
"""
from locmoe.errors import ConfigError

DEVICES_PER_SERVER = 8
HCCS_HALF = 4
ALLOWED_PER_SERVER = (1, 2, 4, 8)
MAX_GROUP_NAME_BYTES = 127  # 128 bytes with the terminating NUL


def _short(values, keep=8):
    values = list(values)
    return str(values) if len(values) <= keep else f"[{', '.join(map(str, values[:keep]))}, ...] ({len(values)})"


def check_server_devices(what, devices_by_server):
    """devices_by_server: {server: [device ids of the group on that server]} -> None or ConfigError.

    `what` names the group or table in the message (e.g. "tp group [0, 1]").
    """
    counts = {server: len(devices) for server, devices in devices_by_server.items()}
    for server, devices in devices_by_server.items():
        if len(devices) not in ALLOWED_PER_SERVER:
            raise ConfigError(what, f"{len(devices)} devices {sorted(devices)} on server {server}",
                              "1, 2, 4 or 8 devices per server (HCCL on Ascend 910A)")
        if len(devices) in (2, 4) and len({d // HCCS_HALF for d in devices}) > 1:
            raise ConfigError(what, f"devices {sorted(devices)} on server {server}",
                              "2 or 4 devices inside one HCCS half (devices 0-3 or 4-7; HCCL on Ascend 910A)")
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{s}: {c}" for s, c in list(counts.items())[:6])
        raise ConfigError(what, f"devices per server {{{shown}{', ...' if len(counts) > 6 else ''}}}",
                          "the same device count on every server (HCCL on Ascend 910A)")


def check_group_name(name):
    size = len(name.encode("utf-8"))
    if size > MAX_GROUP_NAME_BYTES:
        raise ConfigError("HCCL group name", f"{name[:40]}... ({size} bytes)",
                          f"at most {MAX_GROUP_NAME_BYTES} bytes (128 with the terminating NUL)")


def default_device_of_rank(node_of_rank):
    """Device id of each rank = its position among its node's ranks (the launchers' rank order)."""
    seen, devices = {}, []
    for node in node_of_rank:
        devices.append(seen.get(node, 0))
        seen[node] = seen.get(node, 0) + 1
    return tuple(devices)


def check_group(what, ranks, node_of_rank, device_of_rank):
    by_server = {}
    for rank in ranks:
        by_server.setdefault(node_of_rank[rank], []).append(device_of_rank[rank])
    check_server_devices(what, by_server)


def check_topology(topology, device_of_rank=None):
    """Every TP / DP / EP / expert-DP group of `topology` and the world group, against the 910A rules."""
    nodes = topology.node_of_rank
    devices = tuple(device_of_rank) if device_of_rank is not None else default_device_of_rank(nodes)
    check_group("world group", range(topology.world_size), nodes, devices)
    for kind in ("tp", "dp", "ep", "edp"):
        for ranks in topology.all_groups(kind):
            if len(ranks) > 1:
                check_group(f"{kind} group {_short(ranks)}", ranks, nodes, devices)
