"""HCCL rank tables (format 1.0): load, validate, write, summarize.

A rank table lists, per server, the NPUs that take part in a job:

    {"version": "1.0", "server_count": "2",
     "server_list": [{"server_id": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"}, ...],
                      "host_nic_ip": "reserve"}, ...],
     "status": "completed"}

All values are strings in this format. Every problem raises
`locmoe.errors.ConfigError` whose one-line message names the field (with
its server and device), the bad value and what is valid.

CLI: python -m pangu_sigma.cluster.ranktable FILE [--rank-size N] [--local-ranks START COUNT] [--servers]
    [--rank-start-for 'IP ...' [--rank-start N]]
No MindSpore import here: the launch scripts use this on any machine.
"""
import ipaddress
import json
import os
import sys
import tempfile
from dataclasses import dataclass

from locmoe.errors import ConfigError, OneLineArgumentParser
from locmoe.hccl_rules import check_server_devices

FORMAT_VERSION = "1.0"
DEVICES_PER_BOARD = 8  # Ascend 910A: device ids 0..7 on one server


@dataclass(frozen=True)
class RankTable:
    """What a job needs from a rank table, indexed by rank."""
    world_size: int
    server_ids: tuple          # server IPs, in table order
    devices_per_node: int      # most devices on any one server
    node_of_rank: tuple        # rank -> index into server_ids (for locmoe Topology)
    device_id_of_rank: tuple   # rank -> device id on its server


def _require(ok, field, value, valid):
    if not ok:
        raise ConfigError(field, value, valid)


def _require_str_int(value, field, valid):
    """A non-negative decimal integer written as a string (the table's convention)."""
    _require(isinstance(value, str) and value.isdigit() and value.isascii(), field, value,
             f"{valid}, written as a string of digits")
    return int(value)


def _require_ipv4(value, field):
    try:
        ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, TypeError):
        raise ConfigError(field, value, "an IPv4 address string like 192.1.27.6") from None
    return value


def _list_or_type(value):
    """A failed list check shows the (empty) list itself, anything else its type name."""
    return value if isinstance(value, list) else type(value).__name__


def _require_keys(obj, keys, where):
    _require(isinstance(obj, dict), where, type(obj).__name__, f"a JSON object with keys {', '.join(keys)}")
    for key in keys:
        _require(key in obj, f"{where}.{key}", None, "a required field, missing here")


def _check_device(device, where, where_of_rank, where_of_ip):
    _require_keys(device, ("device_id", "device_ip", "rank_id"), where)
    valid_id = f"a device id in 0..{DEVICES_PER_BOARD - 1}"
    device_id = _require_str_int(device["device_id"], f"{where}.device_id", valid_id)
    _require(device_id < DEVICES_PER_BOARD, f"{where}.device_id", device["device_id"], valid_id)
    ip = _require_ipv4(device["device_ip"], f"{where}.device_ip")
    _require(ip not in where_of_ip, f"{where}.device_ip", ip,
             f"unique across the table (each NPU has its own address); {where_of_ip.get(ip)} has it too")
    where_of_ip[ip] = where
    rank = _require_str_int(device["rank_id"], f"{where}.rank_id", "a rank id in 0..N-1")
    _require(rank not in where_of_rank, f"{where}.rank_id", device["rank_id"],
             f"unique across the table; {where_of_rank.get(rank)} has it too")
    where_of_rank[rank] = where
    return device_id, rank


def _check_server(server, index, server_ids, where_of_rank, where_of_ip):
    """Validate one server entry; return {rank: device id} for its devices."""
    _require_keys(server, ("server_id", "device"), f"server_list[{index}]")
    server_id = _require_ipv4(server["server_id"], f"server_list[{index}].server_id")
    _require(server_id not in server_ids, f"server_list[{index}].server_id", server_id,
             "unique; an earlier server has the same id")
    devices = server["device"]
    _require(isinstance(devices, list) and devices, f"server {server_id} device", _list_or_type(devices),
             "a non-empty list of devices")
    device_of_rank, seen_devices = {}, set()
    for d_index, device in enumerate(devices):
        where = f"server {server_id} device[{d_index}]"
        device_id, rank = _check_device(device, where, where_of_rank, where_of_ip)
        _require(device_id not in seen_devices, f"{where}.device_id", device["device_id"],
                 "unique within its server")
        seen_devices.add(device_id)
        device_of_rank[rank] = device_id
    return device_of_rank


def validate_rank_table_dict(table):
    """Check a parsed rank table; return it as a RankTable (raises ConfigError)."""
    _require_keys(table, ("version", "server_count", "server_list", "status"), "rank_table")
    _require(table["version"] == FORMAT_VERSION, "version", table["version"], f'"{FORMAT_VERSION}"')
    _require(table["status"] == "completed", "status", table["status"], '"completed"')
    servers = table["server_list"]
    _require(isinstance(servers, list) and servers, "server_list", _list_or_type(servers),
             "a non-empty list of servers")
    count = _require_str_int(table["server_count"], "server_count", "the number of servers")
    _require(count == len(servers), "server_count", table["server_count"],
             f'"{len(servers)}", the length of server_list')

    server_ids, where_of_rank, where_of_ip, node_and_device = [], {}, {}, {}
    for index, server in enumerate(servers):
        for rank, device_id in _check_server(server, index, server_ids, where_of_rank, where_of_ip).items():
            node_and_device[rank] = (index, device_id)
        server_ids.append(server["server_id"])

    # HCCL on Ascend 910A (locmoe/hccl_rules.py, from CANN's create_group reference): the job uses
    # 1, 2, 4 or 8 devices per server, the same count on every server, 2/4 inside one HCCS half.
    by_server = {}
    for node, device_id in node_and_device.values():
        by_server.setdefault(server_ids[node], []).append(device_id)
    check_server_devices("rank table", by_server)

    world_size = len(node_and_device)
    stray = sorted(r for r in node_and_device if r >= world_size)
    if stray:
        missing = sorted(set(range(world_size)) - set(node_and_device))
        raise ConfigError(f"{where_of_rank[stray[0]]}.rank_id", str(stray[0]),
                          f"rank ids must be exactly 0..{world_size - 1} for {world_size} devices; "
                          f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return RankTable(
        world_size=world_size,
        server_ids=tuple(server_ids),
        devices_per_node=max(len(s["device"]) for s in servers),
        node_of_rank=tuple(node_and_device[r][0] for r in range(world_size)),
        device_id_of_rank=tuple(node_and_device[r][1] for r in range(world_size)),
    )


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("rank_table", str(path), "an existing rank table file; no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("rank_table", str(path), f"a readable UTF-8 file ({type(e).__name__})") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("rank_table", str(path),
                          f"valid JSON; {e.msg} at line {e.lineno} column {e.colno}") from None
    return table


def read_rank_table_dict(path):
    """Read a rank table file as a dict, validated (raises ConfigError)."""
    table = _read_json(path)
    validate_rank_table_dict(table)
    return table


def check_rank_size(table, rank_size, path="rank table"):
    """RANK_SIZE (int or env string) must equal the table's device count."""
    size = rank_size
    if isinstance(rank_size, str):
        size = int(rank_size) if rank_size.strip().isdigit() else None
    _require(isinstance(size, int) and size == table.world_size, "RANK_SIZE", rank_size,
             f"equal to the {table.world_size} devices listed in {path}")


def load_rank_table(path, rank_size=None):
    """Load and validate a rank table; if given, check RANK_SIZE against it."""
    table = validate_rank_table_dict(_read_json(path))
    if rank_size is not None:
        check_rank_size(table, rank_size, path)
    return table


def server_rank_starts(table):
    """[(server_id, first rank, device count)] in table order."""
    return [(server_id, table.node_of_rank.index(n), table.node_of_rank.count(n))
            for n, server_id in enumerate(table.server_ids)]


def rank_start_of_host(table, host_ips, given=None, path="the rank table"):
    """RANK_START of the server whose server_id is one of host_ips (this host's addresses); checked
    against `given` (an explicit RANK_START) when there is one. ConfigError naming SERVER_IP or RANK_START."""
    starts = {server_id: start for server_id, start, _ in server_rank_starts(table)}
    mine = [ip for ip in host_ips if ip in starts]
    _require(len(mine) == 1, "SERVER_IP", " ".join(host_ips) or "(none)",
             f"exactly one server_id of {path} {list(starts)[:4]}{' ...' if len(starts) > 4 else ''} "
             f"(this host's addresses; set SERVER_IP to this server's server_id)")
    start = starts[mine[0]]
    _require(given is None or given == start, "RANK_START", given,
             f"{start}, the first rank of this server {mine[0]} in {path} (or leave it out)")
    return start


def local_device_ids(table, rank_start, count):
    """Device ids of ranks rank_start..rank_start+count-1, which must share one server."""
    _require(count >= 1, "LOCAL_DEVICE_NUM", count, "an integer >= 1")
    _require(rank_start >= 0 and rank_start + count <= table.world_size, "RANK_START", rank_start,
             f"RANK_START + LOCAL_DEVICE_NUM ({rank_start} + {count}) must be <= RANK_SIZE ({table.world_size})")
    ranks = range(rank_start, rank_start + count)
    nodes = sorted({table.node_of_rank[r] for r in ranks})
    firsts = sorted({table.node_of_rank.index(n) for n in set(table.node_of_rank)})
    _require(len(nodes) == 1, "RANK_START", rank_start,
             f"ranks {ranks[0]}..{ranks[-1]} span servers {[table.server_ids[n] for n in nodes]}; "
             f"start at a server's first rank {firsts} and launch at most its device count")
    return [table.device_id_of_rank[r] for r in ranks]


def parse_visible_devices(text, field="ASCEND_VISIBLE_DEVICES"):
    """'4,5,6,7' or '4-7' (or a mix) -> [4, 5, 6, 7]: the physical NPUs this container sees, in order."""
    devices = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        bounds = part.split("-")
        if not all(b.strip().isdigit() for b in bounds) or len(bounds) > 2:
            raise ConfigError(field, text, "physical device ids like 0,1,2,3 or 4-7")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last or last >= DEVICES_PER_BOARD:
            raise ConfigError(field, text, f"ids or ranges a-b with a <= b in 0..{DEVICES_PER_BOARD - 1}")
        devices.extend(range(first, last + 1))
    if not devices or len(set(devices)) != len(devices):
        raise ConfigError(field, text, "a non-empty list of distinct physical device ids")
    return devices


def logical_device_ids(physical_ids, visible=None, field="ASCEND_VISIBLE_DEVICES"):
    """Physical device ids (from the rank table) -> the logical indices set_device needs.

    visible: the physical ids the process can see, in order (None: all, logical = physical).
    CANN's aclrtSetDevice takes an index in [0, visible devices - 1] (AscendCL API
    reference, "set_device"), so inside a container with NPUs 4-7, device 6 is index 2.
    """
    if visible is None:
        return list(physical_ids)
    out = []
    for device in physical_ids:
        _require(device in visible, field, ",".join(map(str, visible)),
                 f"a list containing device {device}, which the rank table assigns to this server")
        out.append(visible.index(device))
    return out


def write_rank_table(path, table):
    """Validate `table` and write it atomically (temp file, then os.replace).

    Formatting is fixed (indent 4, trailing newline) so equal tables give equal bytes.
    A failed write leaves any existing file at `path` untouched.
    """
    validate_rank_table_dict(table)
    folder = os.path.dirname(os.path.abspath(path))
    _require(os.path.isdir(folder), "output", str(path), f"a path in an existing folder; {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".ranktable-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; every job user reads the table
            json.dump(table, f, indent=4)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def summary(table, path):
    servers = ", ".join(table.server_ids)
    return (f"{path}: valid rank table, {table.world_size} devices on {len(table.server_ids)} "
            f"server(s) [{servers}], up to {table.devices_per_node} per server")


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.cluster.ranktable",
                                   description="Validate a rank table and print a one-line summary.")
    parser.add_argument("file", help="rank table JSON (format 1.0)")
    parser.add_argument("--rank-size", help="RANK_SIZE to check against the table")
    parser.add_argument("--local-ranks", nargs=2, type=int, metavar=("START", "COUNT"),
                        help="instead of the summary print 'RANK_SIZE DEVICE_ID...' for ranks "
                             "START..START+COUNT-1 (checked to lie on one server)")
    parser.add_argument("--servers", action="store_true",
                        help="instead of the summary print 'SERVER_ID RANK_START DEVICES' per server")
    parser.add_argument("--rank-start-for", metavar="IPS",
                        help="print the RANK_START of the server whose server_id is one of these space-separated "
                             "addresses (this host's); with --rank-start N, or with --local-ranks, check it")
    parser.add_argument("--rank-start", type=int, help="with --rank-start-for: the RANK_START given at launch")
    parser.add_argument("--visible-devices", metavar="LIST",
                        help="with --local-ranks: the physical NPUs visible here (e.g. 4-7); print "
                             "'RANK_SIZE LOGICAL_ID... PHYSICAL_ID...' instead")
    args = parser.parse_args(argv)
    try:
        table = load_rank_table(args.file, args.rank_size)
        if args.servers:
            print("\n".join(f"{server_id} RANK_START={start} devices={count}"
                            for server_id, start, count in server_rank_starts(table)))
        elif args.rank_start_for is not None and not args.local_ranks:
            print(rank_start_of_host(table, args.rank_start_for.split(), args.rank_start))
        elif args.local_ranks:
            devices = local_device_ids(table, *args.local_ranks)
            if args.rank_start_for is not None:  # the launching host must own these ranks
                rank_start_of_host(table, args.rank_start_for.split(), args.local_ranks[0])
            if args.visible_devices:
                visible = parse_visible_devices(args.visible_devices, "--visible-devices")
                print(table.world_size, *logical_device_ids(devices, visible, "--visible-devices"), *devices)
            else:
                print(table.world_size, *devices)
        else:
            print(summary(table, args.file))
    except ConfigError as e:
        where = "" if e.field == "rank_table" else f"{args.file}: "
        print(f"rank table error: {where}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
