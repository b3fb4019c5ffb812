"""Routing report of a trained model: plots (the paper's figs. 8, 9, 12) and report.md.

    python -m pangu_sigma.tools.routing_report --config FILE --checkpoint PATH --output DIR
        [--train-log FILE] [--set a.b=c ...] [--split valid] [--max-tokens T]
        [--expert E] [--other-expert E] [--grid-experts K] [--quantile Q]

Writes into DIR, per MoE layer (block index b):
- fig8_pair_cosines_layer<b>.png   grid i, j: histogram of cosine similarities
                                   between tokens routed to expert i and to
                                   expert j (router inputs; the diagonal leaves
                                   out self-pairs). At most --grid-experts
                                   experts (the most loaded), sampled tokens.
- fig9_gate_cosines_layer<b>.png   for one expert (--expert, default the most
                                   loaded): cosine of the tokens routed to it
                                   with its gate weight (chosen) and with
                                   another expert's (--other-expert, default
                                   the next index); LocMoE / Switch only.
- fig12_expert_load.png            per layer, the share of each expert over
                                   training steps (training log).
- drop_locality.png                per layer, drop rate and locality fraction
                                   over training steps (training log).
- report.md                        tables: per-layer load, drop rate, locality,
                                   how consistently a token id goes to one
                                   expert, and delta on the captured split; the same
                                   from the training log; per domain and
                                   overall: tokens, perplexity, load, drops,
                                   locality (eval, routed as in training);
                                   links to the plots.
- report.json                      the captured table and eval's figures.
The training log is <run>/train_log_rank<r>.jsonl found from the checkpoint
(a run folder, its checkpoints/rank_<r> folder, or a .ckpt in it), or
--train-log. matplotlib is an optional dependency (extra `plots`).
"""
import json
import os
import sys

import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.data.output_folder import check_creatable
from pangu_sigma.tools._cli import OneLineParser, fail, write_json
from pangu_sigma.tools.routing_capture import (DEFAULT_QUANTILE, capture_routing, chosen_cosines, estimate_delta,
                                               gate_cosines, layer_stats, pair_cosines, token_consistency)

MATPLOTLIB_MISSING = ("the routing report needs matplotlib, which is not installed: "
                      "pip install matplotlib (or the package's 'plots' extra)")
DEFAULT_MAX_TOKENS = 8192


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or ConfigError with a one-line install hint."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("matplotlib", None, MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def find_train_log(checkpoint_path):
    """train_log_rank<r>.jsonl of the run a checkpoint belongs to, or None."""
    path = os.path.abspath(checkpoint_path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    rank = 0
    for _ in range(4):
        base = os.path.basename(folder)
        if base.startswith("rank_") and base[5:].isdigit():
            rank = int(base[5:])
        candidate = os.path.join(folder, f"train_log_rank{rank}.jsonl")
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None


def read_train_log(path, read_jsonl):
    """The records of a JSON-lines training log; one ConfigError line if it is not one."""
    try:
        records = read_jsonl(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("--train-log", path, f"a JSON-lines training log (train_log_rank<r>.jsonl); it is not "
                          f"one ({type(error).__name__}: {str(error)[:80]})") from None
    if not all(isinstance(record, dict) for record in records):
        raise ConfigError("--train-log", path, "a JSON-lines training log of one JSON object per line")
    return records


def log_series(records):
    """(steps [K], load [K, M, E], dropped [K, M], local [K, M]) of the records that carry expert stats."""
    rows = [r for r in records if r.get("expert_load")]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    load = np.array([r["expert_load"] for r in rows], np.float64)
    dropped = np.array([r["dropped"] for r in rows], np.float64)
    local = np.array([r["local"] for r in rows], np.float64)
    return steps, load, dropped, local


def load_summary(load, dropped, local):
    """Per-layer max/mean load, smallest expert's share, drop rate, local fraction from summed counts."""
    load = np.asarray(load, np.float64)
    routed = np.maximum(load.sum(-1), 1e-300)  # [M]
    share = load / routed[:, None]
    experts = load.shape[-1]
    return [{"max_over_mean": float(share[m].max() * experts), "min_share": float(share[m].min()),
             "drop_rate": float(dropped[m] / routed[m]), "local_fraction": float(local[m] / routed[m]),
             "shares": share[m].tolist()} for m in range(load.shape[0])]


# ---------------------------------------------------------------- plots
def plot_pair_cosines(plt, layer, experts, path, max_tokens=200, bins=40):
    """Fig. 8 as one axes: cell (row i, column j) holds the histogram of cos(token routed to i, token routed
    to j) over [-1, 1], scaled to the cell's height (one PolyCollection: fast for 16 x 16 cells)."""
    from matplotlib.collections import PolyCollection

    k = len(experts)
    rng = np.random.default_rng(0)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    polys, colors, means = [], [], np.full((k, k), np.nan)
    for a, i in enumerate(experts):
        for b, j in enumerate(experts):
            cos = pair_cosines(layer.tokens, layer.expert_index, i, j, max_tokens, rng)
            if not cos.size:
                continue
            means[a, b] = cos.mean()
            counts, _ = np.histogram(cos, bins=edges)
            height = 0.85 * counts / max(counts.max(), 1)
            x = b + 0.05 + 0.9 * (edges + 1.0) / 2.0  # cos in [-1, 1] -> [b + 0.05, b + 0.95]
            y0 = -a - 0.95
            xs = np.repeat(x, 2)[1:-1]  # step outline
            ys = y0 + np.repeat(height, 2)
            polys.append(np.column_stack([np.concatenate([[x[0]], xs, [x[-1]]]),
                                          np.concatenate([[y0], ys, [y0]])]))
            colors.append("tab:orange" if i == j else "tab:blue")
    fig, ax = plt.subplots(figsize=(0.9 * k + 1.5, 0.75 * k + 1.5))
    ax.add_collection(PolyCollection(polys, facecolors=colors, edgecolors="none"))
    for a in range(k + 1):
        ax.axhline(-a, color="0.85", lw=0.5)
        ax.axvline(a, color="0.85", lw=0.5)
    for b in range(k):  # cos = 0 inside every column
        ax.vlines(b + 0.5, -k, 0, colors="0.7", lw=0.3, linestyles=":")
    ax.set_xlim(0, k)
    ax.set_ylim(-k, 0)
    ax.set_xticks(np.arange(k) + 0.5)
    ax.set_xticklabels([f"e{j}" for j in experts], fontsize=7)
    ax.set_yticks(-np.arange(k) - 0.5)
    ax.set_yticklabels([f"e{i}" for i in experts], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_xlabel("each cell: cosine from -1 (left) to 1 (right); dotted line at 0", fontsize=8)
    ax.set_title(f"block {layer.block}: cosine between tokens routed to expert i (row) and j (column)",
                 fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return means


def plot_gate_cosines(plt, layer, expert, other, path, bins=50):
    mine = layer.expert_index == expert
    tokens = layer.tokens[mine]
    cos = gate_cosines(tokens, layer.gate_weight) if len(tokens) else np.zeros((0, layer.gate_weight.shape[0]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = float(min(cos[:, expert].min(), cos[:, other].min())) if len(tokens) else -1.0
    hi = float(max(cos[:, expert].max(), cos[:, other].max())) if len(tokens) else 1.0
    ax.hist(cos[:, other], bins=bins, range=(lo, hi), alpha=0.7, color="tab:blue",
            label=f"with expert {other}'s gate weight")
    ax.hist(cos[:, expert], bins=bins, range=(lo, hi), alpha=0.7, color="tab:orange",
            label=f"with expert {expert}'s gate weight (chosen)")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("tokens")
    ax.set_title(f"block {layer.block}: {len(tokens)} tokens routed to expert {expert}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_expert_load(plt, steps, load, blocks, path):
    layers, experts = load.shape[1], load.shape[2]
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers + 1, 4), squeeze=False)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1e-300)  # [K, M, E]
    for m in range(layers):
        ax = axes[0][m]
        image = ax.imshow(share[:, m, :], aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          extent=(-0.5, experts - 0.5, steps[0] - 0.5, steps[-1] + 0.5))
        ax.set_xlabel("expert")
        ax.set_ylabel("step")
        ax.set_title(f"block {blocks[m]}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05, label="share of tokens")
    fig.suptitle("expert load over training (fig. 12)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_drop_locality(plt, steps, load, dropped, local, blocks, path):
    routed = np.maximum(load.sum(-1), 1e-300)  # [K, M]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in range(load.shape[1]):
        axes[0].plot(steps, 100 * dropped[:, m] / routed[:, m], label=f"block {blocks[m]}")
        axes[1].plot(steps, 100 * local[:, m] / routed[:, m], label=f"block {blocks[m]}")
    axes[0].set_title("drop rate (%)", fontsize=9)
    axes[1].set_title("tokens routed to node-local experts (%)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- per domain (eval's figures)
def domain_figures(cfg, checkpoint_path, split, max_tokens):
    """`pangu_sigma.evaluation.eval.evaluate` over the whole batches that cover the first max_tokens tokens of
    the split in training's order, routed as in training: overall and per-domain perplexity, tokens, drops
    and expert load."""
    from pangu_sigma.evaluation.eval import eval_layout, evaluate

    per_batch = cfg.train.micro_batch_size * eval_layout(cfg)["batch_multiplier"] * cfg.model.seq_length  # routed
    return evaluate(cfg, checkpoint_path, split=split, max_batches=max(1, -(-max_tokens // per_batch)),
                    log=lambda *_: None)


def domain_section_note(ev):
    r = ev["routing"]
    return (f"From `pangu_sigma.evaluation.eval` on {ev['tokens']:,} tokens ({r['batches']} batches of "
            f"{r['samples_per_batch']} samples in training's order), routed as in training: {r['scope']} scope, "
            f"{r['token_groups']} token group(s) of {r['tokens_per_group']} tokens, capacity factor "
            f"{r['capacity_factor']:g} ({r['capacity_factor_source']}). (The captured figures above route one "
            f"token group of training's micro-batch of samples in file order, for the cosine plots.)")


def domain_rows(ev, blocks):
    """Table rows: every domain, then 'overall', per MoE layer."""
    rows = []
    for name, fig in list(ev["domains"].items()) + [("overall", ev)]:
        for block, layer in zip(blocks, fig["layers"]):
            rows.append([name, block, f"{fig['tokens']:,}", f"{fig['perplexity']:.3f}",
                         f"{layer['max_over_mean']:.3f}", f"{layer['min_share']:.4f}",
                         f"{100 * layer['drop_rate']:.2f}", f"{100 * layer['local_fraction']:.2f}"])
    return rows


def rows_as_dicts(header, rows):
    return [dict(zip(header, row)) for row in rows]


# ---------------------------------------------------------------- report
def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def make_report(cfg, checkpoint_path, output, train_log=None, split="valid", max_tokens=DEFAULT_MAX_TOKENS,
                expert=None, other_expert=None, grid_experts=16, quantile=DEFAULT_QUANTILE, log=print):
    """Write every plot and report.md into `output`; returns {'plots': [...], 'report': path, 'notes': [...]}."""
    from pangu_sigma.training.callbacks import read_jsonl

    plt = import_pyplot()
    num_experts = cfg.num_experts
    for name, value in (("--expert", expert), ("--other-expert", other_expert)):
        if value is not None and not 0 <= value < num_experts:
            raise ConfigError(name, value, f"an expert index in [0, {num_experts})")
    if not (isinstance(grid_experts, int) and grid_experts >= 1):
        raise ConfigError("--grid-experts", grid_experts, "an integer >= 1")
    check_creatable(output, "--output")  # before the capture: a file of that name, or a read-only place
    log_path = train_log or find_train_log(checkpoint_path)
    if train_log and not os.path.isfile(train_log):
        raise ConfigError("--train-log", train_log, "an existing train_log_rank<r>.jsonl")
    records = read_train_log(log_path, read_jsonl) if log_path else None
    capture = capture_routing(cfg, checkpoint_path, split=split, max_tokens=max_tokens)
    by_domain = domain_figures(cfg, checkpoint_path, split, max_tokens)
    os.makedirs(output, exist_ok=True)
    plots, notes = [], []
    blocks = [layer.block for layer in capture.layers]
    rows = []
    token_node = capture.token_node()  # [N], the same for every layer
    for layer in capture.layers:
        stats = layer_stats(layer, num_experts, capture.token_local(layer))
        load = stats["load"]
        share = load / max(load.sum(), 1)
        consistency = [token_consistency(capture.token_ids, layer.expert_index, groups)["modal_share"]
                       for groups in (None, token_node)]
        row = [layer.block, len(layer.expert_index), f"{share.max() * num_experts:.3f}", f"{share.min():.4f}",
               f"{100 * stats['drop_rate']:.2f}", f"{100 * stats['local_fraction']:.2f}"]
        row += ["n/a" if c is None else f"{100 * c:.2f}" for c in consistency]
        chosen_e = int(np.argmax(load)) if expert is None else expert
        grid = sorted(np.argsort(-load, kind="stable")[:min(grid_experts, num_experts)].tolist())
        path = os.path.join(output, f"fig8_pair_cosines_layer{layer.block}.png")
        plot_pair_cosines(plt, layer, grid, path)
        plots.append(path)
        if capture.has_gate:
            est = estimate_delta(layer.tokens, layer.gate_weight, layer.expert_index, quantile)
            cos = gate_cosines(layer.tokens, layer.gate_weight)  # [N, E]
            chosen = chosen_cosines(layer.tokens, layer.gate_weight, layer.expert_index)  # [N]
            others = (cos.sum(1) - chosen) / max(1, num_experts - 1)  # [N] mean over the other experts
            other = (chosen_e + 1) % num_experts if other_expert is None else other_expert
            row += [f"{est.delta:.4f}", f"{est.mean:.4f}", f"{float(others.mean()):.4f}"]
            path = os.path.join(output, f"fig9_gate_cosines_layer{layer.block}.png")
            plot_gate_cosines(plt, layer, chosen_e, other, path)
            plots.append(path)
        rows.append(row)
    if not capture.has_gate:
        notes.append(f"fig. 9 and delta skipped: the {capture.router} router maps token ids through a table and has "
                     "no gate weight")
    series = None
    if log_path:
        series = log_series(records)
    if series is None:
        notes.append("fig. 12 and the training-log table skipped: no training log with expert statistics found "
                     "(pass --train-log)")
    else:
        steps, load, dropped, local = series
        path = os.path.join(output, "fig12_expert_load.png")
        plot_expert_load(plt, steps, load, blocks, path)
        plots.append(path)
        path = os.path.join(output, "drop_locality.png")
        plot_drop_locality(plt, steps, load, dropped, local, blocks, path)
        plots.append(path)
    lines = [f"# Routing report: {cfg.moe.router}", "",
             f"- config: router {cfg.moe.router}, {num_experts} experts, {cfg.model.moe_layer_num} MoE layers, "
             f"d = {cfg.model.hidden_size}, capacity factor {cfg.moe.capacity_factor}",
             f"- checkpoint: `{checkpoint_path}`",
             f"- captured: {len(capture.layers[0].expert_index)} {split} tokens per layer, capacity "
             f"{capture.capacity} per expert per group of {capture.tokens_per_group} tokens, routed as in training "
             f"({capture.scope} scope, {len(capture.group_masks)} token group(s), each with its rank's node-local "
             f"experts; group 0: {np.flatnonzero(capture.group_masks[0]).tolist()})",
             f"- training log: `{log_path}`" if log_path else "- training log: none", "",
             f"## Routing on the {split} split", ""]
    header = ["block", "tokens", "max/mean load", "smallest share", "drop %", "local %", "token id's modal expert %",
              "same, per node %"]
    if capture.has_gate:
        header += [f"delta (q={quantile:g})", "mean cos chosen", "mean cos others"]
    lines += _table(header, rows)
    lines += ["", "token id's modal expert %: over the token ids seen at least twice, the share of their occurrences "
                  "routed to the id's most frequent expert (100 for a token-id table; a router that reads the context "
                  "sends some occurrences of an id elsewhere). Per node: the same with an id on each node counted "
                  "apart (a router that keeps tokens on their node sends one id to each node's experts)."]
    if capture.has_gate:
        lines += ["", f"delta = the {quantile:g} quantile of cos(token, gate weight of its chosen expert) "
                      "(Theorem 1; the paper measured about 0.03); see `python -m pangu_sigma.tools.capacity_bound`."]
    if series is not None:
        steps, load, dropped, local = series
        half = max(1, len(steps) // 2)
        summary = load_summary(load[-half:].sum(0), dropped[-half:].sum(0), local[-half:].sum(0))
        lines += ["", f"## Training log, steps {steps[-half]}..{steps[-1]} (the last half)", ""]
        lines += _table(["block", "max/mean load", "smallest share", "drop %", "local %"],
                        [[b, f"{s['max_over_mean']:.3f}", f"{s['min_share']:.4f}", f"{100 * s['drop_rate']:.2f}",
                          f"{100 * s['local_fraction']:.2f}"] for b, s in zip(blocks, summary)])
    lines += ["", f"## Per domain on the {split} split", "", domain_section_note(by_domain), ""]
    lines += _table(["domain", "block", "tokens", "perplexity", "max/mean load", "smallest share", "drop %",
                     "local %"], domain_rows(by_domain, blocks))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    report = os.path.join(output, "report.md")
    with open(report, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    figures_path = os.path.join(output, "report.json")
    write_json(figures_path, {"split": split, "blocks": blocks, "captured_layers": rows_as_dicts(header, rows),
                              "eval": by_domain})
    log(f"[routing_report] wrote {report}, {figures_path} and {len(plots)} plots")
    return {"plots": plots, "report": report, "json": figures_path, "notes": notes, "eval": by_domain}


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.routing_report",
                           description="Routing plots (figs. 8, 9, 12) and report.md for a trained model.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help=".ckpt file or run folder")
    parser.add_argument("--output", required=True, help="folder for the plots and report.md")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--train-log", help="training log (default: found from the checkpoint's run folder)")
    parser.add_argument("--split", default="valid", choices=("valid", "train"))
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--expert", type=int, help="expert of fig. 9 (default: the most loaded)")
    parser.add_argument("--other-expert", type=int, help="the other expert of fig. 9 (default: the next index)")
    parser.add_argument("--grid-experts", type=int, default=16, help="experts in the fig. 8 grid (most loaded)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help="delta quantile (default 0.01)")
    args = parser.parse_args(argv)
    try:
        import_pyplot()  # fail fast, before loading anything
        from pangu_sigma.config import load_config
        cfg = load_config(args.config, args.set)
        make_report(cfg, args.checkpoint, args.output, args.train_log, args.split, args.max_tokens, args.expert,
                    args.other_expert, args.grid_experts, args.quantile)
    except ConfigError as err:
        return fail(err.valid if err.field == "matplotlib" else err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
