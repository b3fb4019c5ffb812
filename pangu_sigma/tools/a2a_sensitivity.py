"""How much LocMoE's step time would gain if the All-to-All weighed what the paper measured.

    python -m pangu_sigma.tools.a2a_sensitivity [--targets 128:18.10,256:28.74] [--config-dir configs]
        [--domain-sizes N,N,...] [--json]

The simulator's link model (pangu_sigma.tools.cost_model) gives the MoE All-to-All 2-4 % of a
baseline step; the paper measured 18.10 % (128N) and 28.74 % (256N) for PanGu-Sigma. For each
(cluster size, share): the effective All-to-All bandwidth, as a multiple s of the links' rates
(Hardware.a2a_bandwidth_scale), at which the Hash baseline's All-to-All takes that share of its
simulated step (bisection on s), then every router's cluster config simulated at the same s, and
LocMoE's step-time change against Hash and Switch. A sensitivity line: the defaults stay the link
rates; nothing here is tuned to the paper.
"""
import json
import os
import sys

from locmoe.errors import ConfigError
from pangu_sigma.tools._cli import OneLineParser, fail
from pangu_sigma.tools.cost_model import Hardware

PAPER_SHARES = {128: 18.10, 256: 28.74}  # % of the step in All-to-All, PanGu-Sigma (the paper, sec. 4)
ROUTERS = ("locmoe", "hash", "switch")


def _simulate(config_dir, router, world, scale, domain_sizes):
    from pangu_sigma.config import load_config
    from pangu_sigma.tools.simulate import run
    cfg = load_config(os.path.join(config_dir, f"{router}_{world}n.yaml"))
    return run(cfg, world_size=world, hw=Hardware(a2a_bandwidth_scale=scale).validate(), domain_sizes=domain_sizes)


def scale_for_share(share_percent, simulate_at, low=1e-4, high=1.0, steps=60):
    """The scale s in [low, high] at which simulate_at(s)['a2a_fraction'] reaches share_percent %
    (the fraction falls as s grows); ConfigError if the links alone already exceed it."""
    target = share_percent / 100
    if simulate_at(high)["a2a_fraction"] >= target:
        raise ConfigError("--targets", share_percent, f"a share above the link rates' own "
                                                      f"{100 * simulate_at(high)['a2a_fraction']:.2f} %")
    for _ in range(steps):
        mid = (low * high) ** 0.5  # bisection in log scale
        if simulate_at(mid)["a2a_fraction"] > target:
            low = mid
        else:
            high = mid
    return (low * high) ** 0.5


def sensitivity(world, share_percent, config_dir, domain_sizes=None):
    """One size: {'world', 'target_share', 'scale', 'hash_share', router: step seconds, 'locmoe_vs_<r>'}."""
    scale = scale_for_share(share_percent, lambda s: _simulate(config_dir, "hash", world, s, domain_sizes))
    out = {"world": world, "target_share_percent": share_percent, "a2a_bandwidth_scale": scale}
    for router in ROUTERS:
        result = _simulate(config_dir, router, world, scale, domain_sizes)
        out[router] = {"step_ms": 1e3 * result["step_time"], "a2a_share_percent": 100 * result["a2a_fraction"]}
    for base in ("hash", "switch"):
        out[f"locmoe_vs_{base}_percent"] = 100 * (out["locmoe"]["step_ms"] / out[base]["step_ms"] - 1)
    return out


def parse_targets(text):
    """'128:18.10,256:28.74' -> {128: 18.1, 256: 28.74}."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item]
        targets = {int(n): float(p) for n, p in pairs}
    except ValueError:
        raise ConfigError("--targets", text, "SIZE:PERCENT pairs, e.g. 128:18.10,256:28.74") from None
    if not targets or any(n < 1 or not 0 < p < 100 for n, p in targets.items()):
        raise ConfigError("--targets", text, "SIZE:PERCENT pairs with sizes >= 1 and 0 < PERCENT < 100")
    return targets


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.a2a_sensitivity",
                           description="LocMoE's simulated step-time change at the All-to-All share the paper measured.")
    parser.add_argument("--targets", default=",".join(f"{n}:{p}" for n, p in PAPER_SHARES.items()))
    parser.add_argument("--config-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
    parser.add_argument("--domain-sizes", default="1,1,1,1",
                        help="samples per domain for the domain-affine placement (default: 4 equal domains)")
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    args = parser.parse_args(argv)
    try:
        from pangu_sigma.cluster.plan import parse_domain_sizes
        targets = parse_targets(args.targets)
        sizes = parse_domain_sizes(args.domain_sizes)
        for world, share in targets.items():
            row = sensitivity(world, share, args.config_dir, sizes)
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            print(f"{world}N: the Hash baseline's All-to-All is {share:.2f} % of its step at "
                  f"{row['a2a_bandwidth_scale']:.4f}x the link rates; step LocMoE {row['locmoe']['step_ms']:,.1f} ms, "
                  f"Hash {row['hash']['step_ms']:,.1f} ms, Switch {row['switch']['step_ms']:,.1f} ms: LocMoE "
                  f"{row['locmoe_vs_hash_percent']:+.2f} % vs Hash, {row['locmoe_vs_switch_percent']:+.2f} % vs Switch",
                  flush=True)
    except ConfigError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
