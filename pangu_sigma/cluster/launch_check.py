"""Check a launch against its config before starting anything (used by run_scripts/run_msrun.sh).

    python -m pangu_sigma.cluster.launch_check --config FILE --workers N [--nodes M] [--world-size W]
        [--source TEXT] [--set a.b=c ...]

`--workers` processes per node must match `parallel.devices_per_node`: the
topology puts consecutive blocks of devices_per_node ranks on one node, so a
mismatch mislabels nodes (wrong node-local experts, wrong locality loss, a
TP group "inside a node" that is not). On Ascend they must be equal, and 1, 2,
4 or 8 (HCCL on 910A, locmoe/hccl_rules.py). On CPU, where every worker runs on
this machine, devices_per_node may split the workers into several emulated
nodes (configs/cpu_msrun4.yaml: 4 workers, 2 "nodes" of 2), so it must divide
them. The world (W, default N x M) must be the cluster the config is for: parallel.world_size
and train.global_batch_size (pangu_sigma.config.check_cluster; --source names where W came
from in the message). Prints the device target on success; one line and exit 2 otherwise.
No MindSpore import.
"""
import sys

from locmoe.errors import ConfigError, OneLineArgumentParser
from locmoe.hccl_rules import ALLOWED_PER_SERVER


def check_workers(cfg, workers):
    """ConfigError unless `workers` per node fits parallel.devices_per_node (see the module docstring)."""
    dpn = cfg.parallel.devices_per_node
    if cfg.parallel.device_target == "Ascend":
        if workers not in ALLOWED_PER_SERVER:
            raise ConfigError("--workers", workers, "1, 2, 4 or 8 processes per server (HCCL on Ascend 910A)")
        if dpn != workers:
            raise ConfigError("parallel.devices_per_node", dpn,
                              f"{workers}, the --workers per node of this launch (else ranks are put on the "
                              f"wrong nodes); set --set parallel.devices_per_node={workers}")
    elif workers % dpn:
        raise ConfigError("parallel.devices_per_node", dpn,
                          f"a divisor of --workers {workers} (on CPU the workers of this machine form "
                          f"{workers}/devices_per_node emulated nodes)")


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.cluster.launch_check",
                                   description="Check --workers against the config's parallel.devices_per_node.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", required=True, type=int)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--world-size", type=int, help="the launch's device count (default: workers x nodes)")
    parser.add_argument("--source", help="where the device count comes from, for the messages")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        from pangu_sigma.config import check_cluster, load_config
        cfg = load_config(args.config, args.set)
        check_workers(cfg, args.workers)
        world = args.world_size or args.workers * args.nodes
        check_cluster(cfg, world, args.source or f"--workers {args.workers} x --nodes {args.nodes}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cfg.parallel.device_target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
