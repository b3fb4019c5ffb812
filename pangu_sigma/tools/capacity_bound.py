"""Theorem 1's lower bound on expert capacity, with delta given or measured from a trained model.

    python -m pangu_sigma.tools.capacity_bound --hidden-size D --experts N --delta X
    python -m pangu_sigma.tools.capacity_bound --checkpoint PATH --config FILE [--set a.b=c ...]
        [--quantile Q] [--split valid] [--max-tokens T] [--hidden-size D --experts N] [--json]

Prints p_delta (Lemma 3, eq. 8) exactly, 1 - I_{delta^2}(1/2, (d-1)/2), and in the
large-d erfc form, and the bound ec_min = 1 / (n p_delta) in both forms plus the
looser exp form of eq. 9.

With a checkpoint, delta is estimated per MoE layer from real routing (figure 9):
the valid split runs through the model, the router input of every MoE layer (the
LayerNorm output the layer receives) is captured, and for each token the cosine
to its chosen expert's gate weight is taken (LocMoE: the GrAP row of eq. 4;
Switch: the dense gate row; Hash/RRE have no gate and are refused). delta is the
--quantile quantile of that cosine (default 0.01, the 1st percentile: the
"minimum" angle of Assumption 3 without the single worst outlier); the mean,
median and minimum are reported too. The capacity the config uses,
ec = ceil(T * c_f / E) for T = micro-batch * model.seq_length tokens per
rank (train.batch_size / train.gradient_accumulation_steps sequences: what one rank
routes at once), is printed next to the bound. --config without --checkpoint only adds
that line (and supplies d and n).
"""
import sys

from locmoe.capacity import critical_capacity, critical_capacity_exp_bound, expert_capacity, p_delta, p_delta_erfc
from locmoe.errors import ConfigError
from pangu_sigma.tools._cli import OneLineParser, dumps, fail
from pangu_sigma.tools.routing_capture import DEFAULT_MAX_TOKENS, DEFAULT_QUANTILE, capture_routing, estimate_delta


def bound(hidden_size, num_experts, delta):
    """Every form of Lemma 3 / Theorem 1 for one delta, as a dict (bounds None when delta <= 0)."""
    out = {"hidden_size": hidden_size, "experts": num_experts, "delta": delta}
    if not 0.0 < delta < 1.0:
        out.update(p_delta=None, p_delta_erfc=None, ec_min=None, ec_min_erfc=None, ec_min_exp=None,
                   note="delta must be a cosine in (0, 1) for the bound; the measured one is not")
        return out
    out.update(p_delta=p_delta(hidden_size, delta), p_delta_erfc=p_delta_erfc(hidden_size, delta),
               ec_min=critical_capacity(num_experts, hidden_size, delta, exact=True),
               ec_min_erfc=critical_capacity(num_experts, hidden_size, delta, exact=False),
               ec_min_exp=critical_capacity_exp_bound(num_experts, hidden_size, delta))
    return out


def config_capacity(cfg):
    """The capacity the config uses: slots per expert for the tokens one rank routes at once (a micro-batch)."""
    from pangu_sigma.cluster.param_count import tokens_per_rank
    tokens = tokens_per_rank(cfg)
    out = {"tokens_per_rank": tokens, "capacity_factor": cfg.moe.capacity_factor, "experts": cfg.num_experts,
           "expert_capacity": expert_capacity(tokens, cfg.moe.capacity_factor, cfg.num_experts)}
    if cfg.moe.remote_capacity_factor > 0:  # two tiers: the reduced capacity of the pairs that cross nodes
        out.update(remote_capacity_factor=cfg.moe.remote_capacity_factor,
                   remote_capacity=expert_capacity(tokens, cfg.moe.remote_capacity_factor, cfg.num_experts))
    return out


def _fmt(value, spec=".6g"):
    return "n/a" if value is None else format(value, spec)


def render(result):
    """Human-readable text of a result dict (see run())."""
    lines = ["Theorem 1 lower bound on expert capacity (LocMoE sec. 3.2, eqs. 8-9)"]
    d, n = result["hidden_size"], result["experts"]
    given = result.get("given")
    if given:
        lines += [f"  d (hidden_size) = {d}, n (experts) = {n}, delta = {given['delta']} (given)",
                  f"  p_delta exact = 1 - I_(delta^2)(1/2, (d-1)/2)        = {_fmt(given['p_delta'])}",
                  f"  p_delta erfc  = erfc(sqrt(delta^2 d / (2 - delta^2))) = {_fmt(given['p_delta_erfc'])}",
                  f"  ec_min exact  = 1 / (n p_delta)                       = {_fmt(given['ec_min'])}",
                  f"  ec_min erfc   = 1 / (n erfc(...))                     = {_fmt(given['ec_min_erfc'])}",
                  f"  exp form      = (1/n) exp(delta^2 d / (2 - delta^2))  = {_fmt(given['ec_min_exp'])}"
                  "  (looser)"]
    measured = result.get("measured")
    if measured:
        q = measured["quantile"]
        lines += [f"  d (hidden_size) = {d}, n (experts) = {n}; router {measured['router']}; "
                  f"delta = the {q:g} quantile of cos(token, chosen expert's gate weight) over "
                  f"{measured['split']} tokens",
                  f"  {'layer':>5} {'tokens':>7} {'delta':>8} {'mean':>7} {'median':>7} {'min':>8} "
                  f"{'p_delta':>10} {'ec_min':>10} {'ec_min_erfc':>11}"]
        for row in measured["layers"]:
            est, b = row["estimate"], row["bound"]
            lines.append(f"  {row['block']:>5} {est['tokens']:>7} {est['delta']:>8.4f} {est['mean']:>7.4f} "
                         f"{est['median']:>7.4f} {est['minimum']:>8.4f} {_fmt(b['p_delta'], '10.4g'):>10} "
                         f"{_fmt(b['ec_min'], '10.4g'):>10} {_fmt(b['ec_min_erfc'], '11.4g'):>11}")
    if measured:
        lines.append(f"  the MoE layers used {measured['layer_capacity']} slots per expert for groups of "
                     f"{measured['tokens_per_group']} tokens in this forward")
    cap = result.get("config_capacity")
    if cap:
        bounds = []
        if given and given["ec_min"] is not None:
            bounds.append(given["ec_min"])
        if measured:
            bounds += [r["bound"]["ec_min"] for r in measured["layers"] if r["bound"]["ec_min"] is not None]
        verdict = ""
        if bounds:
            worst = max(bounds)
            verdict = (f"; {'above' if cap['expert_capacity'] >= worst else 'BELOW'} the largest bound "
                       f"{worst:.4g}")
        lines.append(f"  config capacity: ec = ceil(T * c_f / E) = ceil({cap['tokens_per_rank']} * "
                     f"{cap['capacity_factor']:g} / {cap['experts']}) = {cap['expert_capacity']} slots per expert "
                     f"(T = batch_size * seq_length tokens per rank){verdict}")
        if "remote_capacity" in cap:
            remote_verdict = ""
            if bounds:
                remote_verdict = (f"; {'above' if cap['remote_capacity'] >= worst else 'BELOW'} the largest bound "
                                  f"{worst:.4g}")
            lines.append(f"  config remote capacity (two tiers, experts on other nodes): ceil({cap['tokens_per_rank']} "
                         f"* {cap['remote_capacity_factor']:g} / {cap['experts']}) = {cap['remote_capacity']} slots "
                         f"per expert{remote_verdict} (under a domain-affine placement with level 1, each pair's "
                         f"slots follow its expected share: this is the 1/E-share pair's, locmoe.tiers)")
    return "\n".join(lines)


def run(args):
    """The result dict for parsed args; raises ConfigError on bad input."""
    cfg = None
    if args.config:
        from pangu_sigma.config import load_config
        cfg = load_config(args.config, args.set)
    elif args.set:
        raise ConfigError("--set", args.set[0], "used together with --config")
    hidden = args.hidden_size if args.hidden_size is not None else (cfg.model.hidden_size if cfg else None)
    experts = args.experts if args.experts is not None else (cfg.num_experts if cfg else None)
    if hidden is None or experts is None:
        raise ConfigError("--hidden-size/--experts", None, "both given, or taken from --config")
    if not hidden >= 2:
        raise ConfigError("--hidden-size", hidden, "an integer >= 2")
    if not experts >= 1:
        raise ConfigError("--experts", experts, "an integer >= 1")
    if cfg is not None and (hidden, experts) != (cfg.model.hidden_size, cfg.num_experts) and args.checkpoint:
        raise ConfigError("--hidden-size/--experts", (hidden, experts),
                          f"those of the config ({cfg.model.hidden_size}, {cfg.num_experts}) when a checkpoint "
                          "is measured")
    result = {"hidden_size": hidden, "experts": experts}
    if args.delta is not None:
        if not 0.0 < args.delta < 1.0:
            raise ConfigError("--delta", args.delta, "a cosine in (0, 1) (the paper measured about 0.03)")
        result["given"] = bound(hidden, experts, args.delta)
    if args.checkpoint:
        if cfg is None:
            raise ConfigError("--checkpoint", args.checkpoint, "used together with --config")
        if cfg.moe.router not in ("locmoe", "switch"):
            raise ConfigError("moe.router", cfg.moe.router, "locmoe or switch: hash and rre have no gate weight, "
                              "so there is no token-to-gate cosine to estimate delta from")
        if not 0.0 <= args.quantile < 1.0:
            raise ConfigError("--quantile", args.quantile, "a number in [0, 1) (0 = the minimum cosine)")
        capture = capture_routing(cfg, args.checkpoint, split=args.split, max_tokens=args.max_tokens)
        layers = []
        for layer in capture.layers:
            est = estimate_delta(layer.tokens, layer.gate_weight, layer.expert_index, args.quantile)
            layers.append({"block": layer.block, "estimate": est.as_dict(), "bound": bound(hidden, experts, est.delta)})
        result["measured"] = {"router": capture.router, "split": capture.split, "quantile": args.quantile,
                              "layers": layers, "layer_capacity": capture.capacity,
                              "tokens_per_group": capture.tokens_per_group}
    if cfg is not None:
        result["config_capacity"] = config_capacity(cfg)
    return result


def parse_args(argv):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.capacity_bound",
                           description="Theorem 1's lower bound on expert capacity (LocMoE eqs. 8-9).")
    parser.add_argument("--hidden-size", type=int, help="d, the token (router input) dimension")
    parser.add_argument("--experts", type=int, help="n, the number of experts")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--delta", type=float, help="the minimum token-to-gate cosine (paper: about 0.03)")
    source.add_argument("--checkpoint", help="estimate delta from this checkpoint (.ckpt or run folder)")
    parser.add_argument("--config", help="run config (required with --checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                        help="delta = this quantile of the chosen-expert cosine (default 0.01; 0 = minimum)")
    parser.add_argument("--split", default="valid", choices=("valid", "train"))
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"tokens to capture (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except ConfigError as err:
        return fail(err)
    print(dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
