"""compare_routers, evaluation stage: the columns of one run's figures (valid split) and their spread
over seeds."""
import math

import numpy as np

def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _remote_drop_percent(valid):
    """Tokens bound for experts on other nodes that were dropped, % of tokens (mean over MoE layers)."""
    if "dropped_remote" not in valid:
        return float("nan")
    return 100 * _mean(valid["dropped_remote"]) / max(valid["tokens"], 1)


def _local_drop_percent(valid):
    """Tokens bound for experts on their group's node that were dropped, % of tokens (mean over layers)."""
    if "dropped_remote" not in valid:
        return float("nan")
    return 100 * _mean(np.subtract(valid["dropped"], valid["dropped_remote"])) / max(valid["tokens"], 1)


def _rerouted_percent(valid):
    """Tokens kept at a node-local expert they were not routed to (moe.reroute_overflow), % of tokens (mean over
    MoE layers); NaN without rerouting."""
    if not valid.get("rerouted"):
        return float("nan")
    return 100 * _mean(valid["rerouted"]) / max(valid["tokens"], 1)


def _rank_local_percent(valid, pick):
    """min or max over data-parallel ranks (token groups) of the rank's local fraction, % (mean over layers)."""
    by_rank = np.asarray(valid.get("local_by_rank") or [], np.float64)  # [M, G]
    if by_rank.size == 0:
        return float("nan")
    own = valid.get("tokens_by_rank")  # [G] each group's tokens (older results: the mean)
    per_group = np.maximum(np.asarray(own, np.float64), 1) if own else max(valid["tokens"] / by_rank.shape[1], 1)
    return float(pick(100 * by_rank.mean(0) / per_group))


def _routing(run, key):
    value = run["valid"].get("routing", {}).get(key)
    return float("nan") if value is None else float(value)


def _mib(count):
    return float("nan") if count is None else count / 2**20


def _min(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.min(values)) if values else float("nan")


# Columns of the router table: (name, format, value of one run). A run is the dict
# `run_figures` returns; adding a column is one line here (per-domain and step-time
# columns are added by `columns`).
RUN_COLUMNS = [
    ("tokens/s", "{:,.0f}", lambda r: r["tokens_per_s"]),
    ("valid ppl", "{:.3f}", lambda r: r["valid"]["perplexity"]),
    ("max/mean load", "{:.3f}", lambda r: _mean([L["max_over_mean"] for L in r["valid"]["layers"]])),
    ("smallest share", "{:.4f}", lambda r: _min([L["min_share"] for L in r["valid"]["layers"]])),
    ("drop %", "{:.2f}", lambda r: 100 * _mean([L["drop_rate"] for L in r["valid"]["layers"]])),
    ("local %", "{:.2f}", lambda r: 100 * _mean([L["local_fraction"] for L in r["valid"]["layers"]])),
    ("local-tier drop %", "{:.2f}", lambda r: _local_drop_percent(r["valid"])),
    ("remote-tier drop %", "{:.2f}", lambda r: _remote_drop_percent(r["valid"])),
    ("rerouted %", "{:.2f}", lambda r: _rerouted_percent(r["valid"])),
    ("rank local % min", "{:.2f}", lambda r: _rank_local_percent(r["valid"], np.min)),
    ("rank local % max", "{:.2f}", lambda r: _rank_local_percent(r["valid"], np.max)),
    ("local C", "{:.0f}", lambda r: _routing(r, "capacity")),
    ("remote C", "{:.0f}", lambda r: _routing(r, "remote_capacity")),
    ("expert rows per rank", "{:.0f}", lambda r: _routing(r, "expert_rows_per_group")),
    ("inter-node MoE MiB/step", "{:.2f}", lambda r: _mib(r.get("moe_inter_node_bytes_per_step"))),
]

# Columns of the per-domain table: (name, format, value of one domain's eval figures).
DOMAIN_COLUMNS = [
    ("tokens", "{:,.0f}", lambda d: d["tokens"]),
    ("ppl", "{:.3f}", lambda d: d["perplexity"]),
    ("max/mean load", "{:.3f}", lambda d: _mean([L["max_over_mean"] for L in d["layers"]])),
    ("drop %", "{:.2f}", lambda d: 100 * _mean([L["drop_rate"] for L in d["layers"]])),
    ("local %", "{:.2f}", lambda d: 100 * _mean([L["local_fraction"] for L in d["layers"]])),
]


def _step_ms(size):
    def value(run):
        sim = run["simulated"].get(size, {})
        return 1e3 * sim["routed"]["step_time"] if "routed" in sim else float("nan")
    return value


def columns(domains, clusters):
    """The router table's columns: RUN_COLUMNS, then each domain's valid ppl, then simulated step times."""
    cols = list(RUN_COLUMNS)
    cols += [(f"ppl {d}", "{:.3f}", lambda r, d=d: r["valid"]["domains"][d]["perplexity"]
              if d in r["valid"]["domains"] else float("nan")) for d in domains]
    cols += [(f"step {n}N (ms)", "{:,.1f}", _step_ms(n)) for n in clusters]
    return cols


def spread(values):
    """Mean, sample standard deviation (0 for one value), min, max and n over the finite values."""
    values = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if not values.size:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def summarize(runs, cols):
    """{column: spread over the runs} for (name, format, value) columns."""
    return {name: spread([value(r) for r in runs]) for name, _, value in cols}
