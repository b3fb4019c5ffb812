#!/usr/bin/env python3
"""Merge per-server rank tables into one.

    python run_scripts/merge_hccl.py OUT.json IN1.json IN2.json ...

Servers are ordered by server_id as an IPv4 address (numerically); within
a server devices keep their rank order; rank ids are renumbered 0..N-1 in
that order. Every input and the result are validated; OUT is written
atomically and never equals an input.
"""
import ipaddress
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locmoe.errors import ConfigError  # noqa: E402
from pangu_sigma.cluster.ranktable import (OneLineArgumentParser, read_rank_table_dict,  # noqa: E402
                                   validate_rank_table_dict, write_rank_table)


def merge_tables(tables_by_path):
    """[(path, table dict), ...] -> one merged table dict."""
    source_of_server, servers = {}, []
    for path, table in tables_by_path:
        for server in table["server_list"]:
            server_id = server["server_id"]
            if server_id in source_of_server:
                raise ConfigError("server_id", server_id,
                                  f"in one input only; found in {source_of_server[server_id]} and {path}")
            source_of_server[server_id] = path
            servers.append(server)
    servers.sort(key=lambda s: ipaddress.IPv4Address(s["server_id"]))

    rank, server_list = 0, []
    for server in servers:
        devices = []
        for device in sorted(server["device"], key=lambda d: int(d["rank_id"])):
            devices.append({"device_id": device["device_id"], "device_ip": device["device_ip"],
                            "rank_id": str(rank)})
            rank += 1
        server_list.append({"server_id": server["server_id"], "device": devices,
                            "host_nic_ip": server.get("host_nic_ip", "reserve")})
    merged = {"version": "1.0", "server_count": str(len(server_list)),
              "server_list": server_list, "status": "completed"}
    validate_rank_table_dict(merged)
    return merged


def read_input(path):
    """A validated input table; errors name the file they come from."""
    try:
        return read_rank_table_dict(path)
    except ConfigError as e:
        if e.field == "rank_table":
            raise
        raise ConfigError(f"{path}: {e.field}", e.value, e.valid) from None


def main(argv=None):
    parser = OneLineArgumentParser(prog="merge_hccl.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="merged rank table to write")
    parser.add_argument("inputs", nargs="+", help="per-server rank tables")
    args = parser.parse_args(argv)
    try:
        out_path = os.path.realpath(args.output)
        for path in args.inputs:
            if os.path.realpath(path) == out_path:
                raise ConfigError("OUT", args.output, "a new file, not one of the inputs (OUT comes first)")
        merged = merge_tables([(path, read_input(path)) for path in args.inputs])
        write_rank_table(args.output, merged)
    except ConfigError as e:
        print(f"merge_hccl.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"merge_hccl.py: error: cannot write the rank table: {e}", file=sys.stderr)
        return 2
    devices = sum(len(s["device"]) for s in merged["server_list"])
    print(f"wrote {args.output}: {devices} devices on {merged['server_count']} servers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
