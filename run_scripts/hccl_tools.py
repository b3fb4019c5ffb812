#!/usr/bin/env python3
"""Write the rank table (format 1.0) for the NPUs of ONE server.

    python run_scripts/hccl_tools.py --device-range "[0,8)" --server-ip 10.0.0.1 \
        [--visible-devices 4-7] [--device-ips 0:192.1.27.6,1:192.2.27.6,...] [--hccn-conf /etc/hccn.conf]
        [--output FILE]

A 910A board has two HCCS groups of 4 NPUs ([0,4) and [4,8)); a range holds
1, 2, 4 or 8 devices (HCCL on 910A, CANN create_group reference) and stays
inside one group or is the whole board. --visible-devices (default
$ASCEND_VISIBLE_DEVICES, else all 8) lists the physical NPUs this container
sees: every device of the range must be one of them. The table keeps the
physical device ids; the launchers export DEVICE_ID as the logical index
among the visible devices (what set_device takes). Device IPs come from
--device-ips or from the `address_N=IP` lines of hccn.conf. Merge the
per-server tables with merge_hccl.py.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locmoe.errors import ConfigError  # noqa: E402
from locmoe.hccl_rules import ALLOWED_PER_SERVER  # noqa: E402
from pangu_sigma.cluster.ranktable import (DEVICES_PER_BOARD, OneLineArgumentParser,  # noqa: E402
                                           parse_visible_devices, validate_rank_table_dict, write_rank_table)

HCCS_GROUP_SIZE = 4


def parse_device_range(text):
    """'[a,b)' -> [a, ..., b-1], refusing ranges that split the two HCCS groups."""
    match = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\)\s*", text)
    if not match:
        raise ConfigError("--device-range", text, 'a half-open range like "[0,8)"')
    start, end = int(match.group(1)), int(match.group(2))
    if not 0 <= start < end <= DEVICES_PER_BOARD:
        raise ConfigError("--device-range", text, f"0 <= start < end <= {DEVICES_PER_BOARD}")
    if end - start not in ALLOWED_PER_SERVER:
        raise ConfigError("--device-range", text, "1, 2, 4 or 8 devices (HCCL on Ascend 910A), e.g. [0,4) or [4,6)")
    in_one_group = start // HCCS_GROUP_SIZE == (end - 1) // HCCS_GROUP_SIZE
    if not (in_one_group or (start, end) == (0, DEVICES_PER_BOARD)):
        raise ConfigError("--device-range", text,
                          "a range inside one 4-NPU HCCS group ([0,4) or [4,8)) or the whole board [0,8)")
    return list(range(start, end))


def parse_device_ips(text):
    """'0:192.1.27.6,1:192.2.27.6' -> {0: '192.1.27.6', 1: '192.2.27.6'}."""
    ips = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*:\s*(\S+)", entry)
        if not match:
            raise ConfigError("--device-ips", entry, "comma-separated DEVICE:IP pairs like 0:192.1.27.6")
        device = int(match.group(1))
        if device in ips:
            raise ConfigError("--device-ips", entry, f"one IP per device; device {device} is listed twice")
        ips[device] = match.group(2)
    return ips


def read_hccn_conf(path):
    """Device IPs from the `address_N=IP` lines of an hccn.conf file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        raise ConfigError("--hccn-conf", path,
                          "a readable hccn.conf with address_N=IP lines, or pass --device-ips 0:IP,1:IP,...") from None
    ips = {}
    for line in lines:
        match = re.fullmatch(r"\s*address_(\d+)\s*=\s*(\S+)\s*", line)
        if match:
            ips[int(match.group(1))] = match.group(2)
    return ips


def build_table(devices, server_ip, ips, ip_source):
    """One-server rank table; rank ids 0..k-1 in device order."""
    for device in devices:
        if device not in ips:
            raise ConfigError(ip_source, f"device {device}", "an IP for every device of --device-range; none given")
    table = {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": server_ip,
            "device": [{"device_id": str(d), "device_ip": ips[d], "rank_id": str(rank)}
                       for rank, d in enumerate(devices)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }
    validate_rank_table_dict(table)
    return table


def main(argv=None):
    parser = OneLineArgumentParser(prog="hccl_tools.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-range", default="[0,8)", help='half-open device range, default "[0,8)"')
    parser.add_argument("--server-ip", required=True, help="this server's IPv4 address (server_id)")
    parser.add_argument("--visible-devices", default=os.environ.get("ASCEND_VISIBLE_DEVICES") or "0-7",
                        help="physical NPUs visible here, e.g. 4-7 (default $ASCEND_VISIBLE_DEVICES, else 0-7)")
    parser.add_argument("--device-ips", help="DEVICE:IP pairs, e.g. 0:192.1.27.6,1:192.2.27.6")
    parser.add_argument("--hccn-conf", default="/etc/hccn.conf", help="read device IPs from here (default %(default)s)")
    parser.add_argument("--output", help="default hccl_{n}p_{devices}_{server_ip}.json")
    args = parser.parse_args(argv)
    try:
        devices = parse_device_range(args.device_range)
        visible = parse_visible_devices(args.visible_devices, "--visible-devices")
        hidden = [d for d in devices if d not in visible]
        if hidden:
            raise ConfigError("--device-range", args.device_range,
                              f"devices visible here (--visible-devices {args.visible_devices}); "
                              f"{hidden} are not")
        if args.device_ips is not None:
            ips, source = parse_device_ips(args.device_ips), "--device-ips"
        else:
            ips, source = read_hccn_conf(args.hccn_conf), f"--hccn-conf {args.hccn_conf}"
        table = build_table(devices, args.server_ip, ips, source)
        output = args.output or f"hccl_{len(devices)}p_{''.join(map(str, devices))}_{args.server_ip}.json"
        write_rank_table(output, table)
    except ConfigError as e:
        print(f"hccl_tools.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hccl_tools.py: error: cannot write the rank table: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {len(devices)} devices {devices} on server {args.server_ip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
