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

AlltoAll and AlltoAllV add one (CANN HCCL C++ API reference, HcclAlltoAll and
HcclAlltoAllV constraints for the Atlas training series, 6.0.1 and 8.0.0): a
communicator spanning servers takes its ranks in whole clusters (a cluster is an
HCCS half: devices 0-3 or 4-7), the same clusters on every server. A single-server
communicator follows the rules above (1 or 2 devices in one half, 4 = one half, 8).
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


def alltoall_problem(ranks, node_of_rank, device_of_rank):
    """Why HCCL on Atlas training refuses `ranks` as an AlltoAll / AlltoAllV communicator, or None.

    Multi-server: each server's devices must be whole HCCS halves ({0-3}, {4-7} or all 8),
    the same halves on every server. A single-server group is not constrained by this rule (it follows
    check_server_devices; an EP group's part on one server, tier 1's group, is checked there as part of
    the EP group by check_topology).
    """
    by_server = {}
    for rank in ranks:
        by_server.setdefault(node_of_rank[rank], []).append(device_of_rank[rank])
    if len(by_server) <= 1:
        return None
    halves_of = {}
    for server, devices in by_server.items():
        got = set(devices)
        halves = tuple(h for h in range(DEVICES_PER_SERVER // HCCS_HALF)
                       if set(range(h * HCCS_HALF, (h + 1) * HCCS_HALF)) <= got)
        if got != {h * HCCS_HALF + i for h in halves for i in range(HCCS_HALF)}:
            return (f"devices {_short(sorted(got))} on server {server} of {len(by_server)} servers are not whole "
                    f"HCCS halves (devices 0-3, 4-7)")
        halves_of[server] = halves
    if len(set(halves_of.values())) > 1:
        shown = ", ".join(f"{s}: {'+'.join(f'{h * HCCS_HALF}-{h * HCCS_HALF + HCCS_HALF - 1}' for h in hs)}"
                          for s, hs in list(halves_of.items())[:4])
        return f"different HCCS halves on different servers ({shown}{', ...' if len(halves_of) > 4 else ''})"
    return None


def alltoall_violations(groups, node_of_rank, device_of_rank):
    """[(label, ranks, why)] for the (label, ranks) pairs breaking the AlltoAll(V) rule (alltoall_problem)."""
    found = []
    for label, ranks in groups:
        why = alltoall_problem(ranks, node_of_rank, device_of_rank)
        if why:
            found.append((label, list(ranks), why))
    return found
