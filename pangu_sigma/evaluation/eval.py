"""Validation perplexity, drops and expert load, overall and per domain:

    python -m pangu_sigma.evaluation.eval --config FILE --checkpoint PATH [--json FILE] [--set a.b=c ...]

Eval routes as training does:
- the token-group layout of the training config: with parallel.virtual_scope=cluster
  the process routes the whole virtual cluster's batch as dp token groups, one per
  data-parallel rank (pangu_sigma.build.single_process_groups), else one group;
- batches of training's micro-batch size (train.batch_size / train.gradient_accumulation_steps
  per data-parallel rank: what training routes at once) in the order of
  training's first epoch (data.shuffle, data.seed), every valid sample counted once
  (the short last batch is filled up to full size with samples that are routed, not
  counted; `eval_forward.eval_batches`);
- capacity factor moe.eval_capacity_factor, default (0) the training moe.capacity_factor.
Perplexity = exp(mean token cross-entropy); per domain the same over that domain's
tokens; the overall CE is the token-weighted mean of the domains' (`domain_stats`).
"""
import dataclasses
import sys

import numpy as np

from locmoe.errors import ConfigError, OneLineArgumentParser, run_cli
from pangu_sigma.training import checkpoint
from pangu_sigma.training.run_identity import split_fields
from pangu_sigma.build import (build_model, dataset_meta, domain_placement, placement_sample_order, set_device,
                               single_process_groups, single_process_topology)
from pangu_sigma.training.callbacks import expert_table
from pangu_sigma.config import load_config
from pangu_sigma.evaluation.domain_stats import (DomainAccumulator, domain_table, pair_counts_of, rerouted_tokens,
                                                 token_local)
from pangu_sigma.evaluation.eval_forward import eval_batches, eval_forward_cell


def eval_capacity_factor(cfg):
    """(capacity factor eval routes with, where it comes from)."""
    if cfg.moe.eval_capacity_factor:
        return float(cfg.moe.eval_capacity_factor), "moe.eval_capacity_factor"
    return float(cfg.moe.capacity_factor), "moe.capacity_factor, as in training"


def eval_layout(cfg):
    """How eval groups tokens: training's layout for this config (a dict; see single_process_groups)."""
    topology = single_process_topology(cfg)
    groups, group_ranks, multiplier = single_process_groups(cfg, topology)
    scope = cfg.parallel.virtual_scope if cfg.parallel.virtual_world_size else "single"
    return {"scope": scope, "token_groups": groups, "group_ranks": group_ranks or [topology.rank] * groups,
            "batch_multiplier": multiplier, "world_size": topology.world_size, "topology": topology}


def routing_plan(cfg, meta, layout, domain_ids, batch_size=None):
    """How eval (and the routing capture) batches a split: ([(sample indices [B], counted [B] bool)], B, the
    domain-affine placement or None). B: the global batch of one routed batch, batch_size (else
    train.batch_size) per data-parallel rank times the ranks a single process routes as (layout). Under
    the domain-affine placement in cluster scope each token group reads its rank's domains, in training's
    order; else eval_batches. Without batch_size, each batch is cut into its
    train.gradient_accumulation_steps micro-batches as training routes them (every group keeps its rows)."""
    from pangu_sigma.data.dataset import split_micro_batches

    per_rank = batch_size or cfg.train.batch_size
    micro = 1 if batch_size else cfg.train.gradient_accumulation_steps
    global_batch = per_rank * layout["batch_multiplier"]
    placement = domain_placement(cfg, meta, layout["topology"]) if layout["scope"] == "cluster" else None
    if placement is not None:  # each token group reads its rank's domains, as in training
        global_batch = placement.slot_domain.size  # the placement's global batch (train.batch_size x dp)
        order = placement_sample_order(cfg, placement, range(layout["topology"].dp))(domain_ids, 0)
        plan = [(order[k:k + global_batch], np.ones(global_batch, bool))
                for k in range(0, len(order) - global_batch + 1, global_batch)]
    else:
        plan = eval_batches(len(domain_ids), global_batch, cfg.data.seed, cfg.data.shuffle)
    if micro > 1:
        plan = [pair for rows, counted in plan
                for pair in zip(split_micro_batches(rows, micro, layout["token_groups"]),
                                split_micro_batches(counted, micro, layout["token_groups"]))]
        global_batch //= micro
    return plan, global_batch, placement


def load_weights(net, cfg, checkpoint_path, allow_changes=(), check=True):
    """The one place eval loads a checkpoint (a .ckpt or a run folder of any layout, merged on the
    fly) into its network, after checking the run's stored config and dataset against cfg (unless check
    is False: the routing capture, which takes the config the user names)."""
    return checkpoint.load_model_for_inference(net, cfg, checkpoint_path, allow_changes, check=check)


def build_eval_net(cfg, meta, layout, capacity_factor, checkpoint_path, allow_changes=(), check=True):
    """PanguSigmaWithLoss with training's token groups and the eval capacity factor, weights loaded."""
    eval_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=capacity_factor))
    net = build_model(eval_cfg, meta, layout["topology"], token_groups=layout["token_groups"],
                      group_ranks=layout["group_ranks"] if layout["token_groups"] > 1 else None,
                      reads_by_placement=layout["scope"] == "cluster")  # as evaluate() reads the split
    load_weights(net, cfg, checkpoint_path, allow_changes, check)
    return net


def remote_tier_text(layer, unit):
    """The remote tier's slots in words: per expert (one unit each), or units of `unit` rows per pair."""
    if layer.remote_quanta == 1 and layer.max_pair_units == 1:
        return f"{unit} per expert"
    units = layer.group_units.asnumpy()  # [G, E]
    pairs = units[units > 0]
    return (f"{unit}-slot units per (group, expert) pair, {int(pairs.min())}-{int(pairs.max())} units by the "
            f"pair's expected share ({layer.remote_quanta} for 1/E; {int(units.sum(1).max())} per group at most)"
            if pairs.size else "no remote pairs")


def evaluate(cfg, checkpoint_path=None, batch_size=None, split="valid", net=None, log=print, max_batches=None,
             per_batch=False, allow_changes=(), pair_counts=False, on_layout=None):
    """Mean CE, perplexity and routing figures over a split, overall and per domain.

    Either loads checkpoint_path into a freshly built network or uses net (a
    PanguSigmaWithLoss built with the layout of `eval_layout(cfg)`) as given.
    batch_size: per data-parallel rank, routed at once (default: training's batches, each cut into
    its train.gradient_accumulation_steps micro-batches as training routes them). max_batches:
    only the first batches of the plan. per_batch: also return each batch's
    routing sums (load [M, E], dropped [M], local [M]) under 'batches'. pair_counts: also
    return the tokens routed to each (token group, expert) pair before capacity, per MoE
    layer and batch, under 'pair_counts' (int64 [M, batches, G, E]; every token the layer
    routes, the filler samples of a short last batch included; pangu_sigma.tools.equal_drops).
    on_layout: a launched cluster's pangu_sigma.evaluation.distributed.TrainingLayout (net: its rank's).
    """
    from mindspore import Tensor
    from pangu_sigma.data.dataset import load_split

    meta = dataset_meta(cfg) if on_layout is None else on_layout.meta
    layout = eval_layout(cfg) if on_layout is None else on_layout.layout
    factor, factor_source = eval_capacity_factor(cfg)
    if net is None:
        set_device(cfg)
        net = build_eval_net(cfg, meta, layout, factor, checkpoint_path, allow_changes)
    net.set_train(False)
    input_ids, domain_ids = load_split(cfg.data.dataset_dir, split)  # [N, S+1], [N]
    if len(input_ids) == 0:
        raise ConfigError("split", split, "a split with at least one sample")
    seq = input_ids.shape[1] - 1
    plan, global_batch, placement = routing_plan(cfg, meta, layout, domain_ids, batch_size)
    if max_batches is not None:
        plan = plan[:max_batches]
    model = net.model
    moe_layers = [model.blocks[i].ffn for i in range(model.dense_layer_num, model.dense_layer_num
                                                      + model.moe_layer_num)] if on_layout is None else \
        on_layout.moe_layers
    if moe_layers and moe_layers[0].token_groups != layout["token_groups"]:
        raise ValueError(f"net routes {moe_layers[0].token_groups} token groups; the config's layout has "
                         f"{layout['token_groups']}")
    local_masks = [layer.local_mask.asnumpy() for layer in moe_layers]  # [G, E] each
    per_group = global_batch * seq // layout["token_groups"]
    capacity = int(moe_layers[0].capacity(per_group)) if moe_layers else 0
    two_tier = bool(moe_layers) and moe_layers[0].two_tier
    remote_capacity = int(moe_layers[0].remote_capacity(per_group)) if two_tier else None
    rows = int(moe_layers[0].buffer_rows(per_group)) if moe_layers else 0  # expert rows per token group
    cell = eval_forward_cell(model) if on_layout is None else on_layout.forward
    acc = DomainAccumulator(meta.get("domains", []), len(moe_layers), cfg.num_experts if moe_layers else 0)
    batches = []
    dropped_remote = np.zeros(len(moe_layers), np.int64)  # [M] drops of tokens bound for other nodes
    local_by_rank = np.zeros((len(moe_layers), layout["token_groups"]), np.int64)  # [M, G]
    tokens_by_rank = np.zeros(layout["token_groups"], np.int64)  # [G] counted tokens each group routed
    experts = cfg.num_experts if moe_layers else 0
    load_by_rank = np.zeros((len(moe_layers), layout["token_groups"], experts), np.int64)  # [M, G, E] routed
    counts = [[] for _ in moe_layers]  # [M][batches] of [G, E]
    reroute = two_tier and moe_layers[0].reroute
    rerouted = np.zeros(len(moe_layers), np.int64)  # [M] counted tokens kept at a node-local expert they were
    if reroute:  # not routed to (moe.reroute_overflow); the slots of every (group, expert) pair:
        pair_slots = (local_masks[0] * capacity + moe_layers[0].group_units.asnumpy() * remote_capacity)
        pair_slots = pair_slots.astype(np.int64)  # [G, E]
    for chosen, counted in plan:
        ids, domains = input_ids[chosen], domain_ids[chosen]  # [B, S+1], [B]
        nll, routing = cell(Tensor(ids), Tensor(domains))
        per_token = [(idx.asnumpy().reshape(-1), keep.asnumpy().reshape(-1) > 0.5,
                      token_local(idx.asnumpy(), mask, per_group))
                     for (idx, keep), mask in zip(routing, local_masks)]  # [B*S] each
        sums = acc.add(nll.asnumpy(), domains, per_token, counted)
        if pair_counts:
            for m, (idx, _) in enumerate(routing):
                counts[m].append(pair_counts_of(idx.asnumpy(), cfg.num_experts))  # [G, E]
        counted_tokens = np.repeat(counted, seq)  # [B*S]
        tokens_by_rank += counted_tokens.reshape(layout["token_groups"], -1).sum(1)  # [G]
        for m, (_, keep, near) in enumerate(per_token):
            dropped_remote[m] += int((counted_tokens & ~keep & ~near).sum())
            if reroute:
                moved = rerouted_tokens(per_token[m][0].reshape(layout["token_groups"], -1),
                                        keep.reshape(layout["token_groups"], -1), pair_slots)  # [G, T]
                rerouted[m] += int((counted_tokens & moved.reshape(-1)).sum())
            local_by_rank[m] += (counted_tokens & near).reshape(layout["token_groups"], -1).sum(1)
            group = np.arange(counted_tokens.size) // per_group  # [B*S] token group of each token
            np.add.at(load_by_rank[m], (group[counted_tokens], per_token[m][0][counted_tokens]), 1)
        if per_batch:
            batches.append({"load": sums[0].tolist(), "dropped": sums[1].tolist(), "local": sums[2].tolist(),
                            "samples": int(counted.sum())})
    figures = acc.result()
    overall = figures["overall"]
    result = {"split": split, "tokens": overall["tokens"], "ce": overall["ce"], "perplexity": overall["perplexity"],
              "expert_load": overall["expert_load"], "dropped": overall["dropped"], "local": overall["local"],
              "layers": overall["layers"], "domains": figures["domains"],
              "dropped_remote": dropped_remote.tolist(), "local_by_rank": local_by_rank.tolist(),
              "rerouted": rerouted.tolist() if reroute else None,
              "tokens_by_rank": tokens_by_rank.tolist(),
              "load_by_rank": load_by_rank.tolist(),
              "routing": {"scope": layout["scope"], "token_groups": layout["token_groups"],
                          "group_ranks": layout["group_ranks"], "world_size": layout["world_size"],
                          "tokens_per_group": per_group, "samples_per_batch": global_batch,
                          "batches": len(plan), "shuffle": cfg.data.shuffle, "seed": cfg.data.seed,
                          "placement": cfg.data.placement if placement is not None else "iid",
                          "capacity_factor": factor, "capacity_factor_source": factor_source,
                          "capacity": capacity, "remote_capacity_factor": cfg.moe.remote_capacity_factor
                          if two_tier else None, "remote_capacity": remote_capacity,
                          # tier-2 capacity of a (group, expert) pair = units * remote_capacity (locmoe.tiers)
                          "expert_rows_per_group": rows,
                          "remote_quanta": moe_layers[0].remote_quanta if two_tier else None,
                          "remote_units": moe_layers[0].group_units.asnumpy().astype(int).tolist()
                          if two_tier else None}}
    if pair_counts and moe_layers:
        result["pair_counts"] = np.array(counts, np.int64).reshape(len(moe_layers), len(plan),
                                                                   layout["token_groups"], -1)  # [M, N, G, E]
    if per_batch:
        result["batches"] = batches
    log(f"[eval] routed as training: {layout['scope']} scope, {layout['token_groups']} token group(s) of "
        f"{per_group} tokens ({global_batch} samples per batch, order of training's first epoch: "
        f"shuffle={cfg.data.shuffle}, data.seed={cfg.data.seed}"
        + (", domain-affine placement: whole global batches, the samples past the last one left out"
           if placement is not None else "")
        + f"), capacity factor {factor:g} ({factor_source}), "
        f"{capacity} slots per expert per group"
        + (f" on the group's node and {remote_tier_text(moe_layers[0], remote_capacity)} on other nodes (two "
           f"tiers, moe.remote_capacity_factor {cfg.moe.remote_capacity_factor:g})" if two_tier else ""))
    log(f"[eval] {split}: {result['tokens']} tokens, mean CE {result['ce']:.4f}, "
        f"perplexity {result['perplexity']:.3f}")
    log(domain_table(figures, title=f"{split} per domain"))
    if moe_layers:
        first = cfg.model.num_layers - cfg.model.moe_layer_num
        by_tier = np.stack([np.asarray(overall["dropped"]) - dropped_remote, dropped_remote]
                           + ([rerouted] if result["rerouted"] is not None else []), 1)  # [M, 2 | 3]
        log(expert_table(np.asarray(overall["expert_load"]), by_tier, local_by_rank,
                         first_layer=first, title=f"expert load on {split}", rank_tokens=tokens_by_rank))
        for name, fig in figures["domains"].items():
            log(expert_table(np.asarray(fig["expert_load"]), fig["dropped"], fig["local"], first_layer=first,
                             title=f"expert load on {split}, domain {name}"))
    return result


def main(argv=None, evaluate_fn=None, prog=None):
    """evaluate_fn: what computes the figures (default evaluate; pangu_sigma.evaluation.distributed's on a
    launched cluster, which returns None on the ranks that do not write --json)."""
    parser = OneLineArgumentParser(prog=prog, description="Validation perplexity, drops and expert load, overall "
                                                          "and per domain, routed as in training.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help=".ckpt file or a run folder (newest checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=None, help="per data-parallel rank (default "
                                                                     "train.batch_size)")
    parser.add_argument("--split", default="valid", choices=("valid", "train"))
    parser.add_argument("--json", help="also write the figures (overall and per domain) to this JSON file")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="FIELD[,FIELD]",
                        help="config or dataset fields allowed to differ from the checkpoint's run")
    args = parser.parse_args(argv)

    def run():
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError("--batch-size", args.batch_size, "an integer >= 1")
        cfg = load_config(args.config, args.set)
        allowed = split_fields(args.allow_config_change)
        result = (evaluate_fn or evaluate)(cfg, args.checkpoint, args.batch_size, args.split, allow_changes=allowed)
        if args.json and result is not None:
            from pangu_sigma.json_io import write_json
            write_json(args.json, result)
            print(f"[eval] wrote {args.json}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
