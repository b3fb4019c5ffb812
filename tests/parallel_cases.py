"""Shared by the equivalence test and its msrun worker: the cases, their configs and runs.

Every case trains the same tiny PanGu-Sigma for 2 optimizer steps on the same
global batch, once in one process (token groups posing as the ranks) and once
on msrun CPU workers; nothing is dropped (capacity factor = experts). The
workers load the single process's initial weights, except in SEED_CASES, where
every process initialises itself from the seed (no initial checkpoint).
"""
import numpy as np
import mindspore as ms

from locmoe.parallel_context import ParallelContext
from locmoe.topology import Topology

VOCAB, SEQ, EXPERTS, GLOBAL_BATCH, STEPS = 64, 8, 4, 4, 2
META = {"vocab_size": VOCAB, "seq_length": SEQ, "domains": ["a", "b"],
        "domain_samples": {"a": {"train": 10, "valid": 1}, "b": {"train": 10, "valid": 1}}}
# MIXED_UNITS cases read domains a and b 3:1, so the domain-affine placement gives domain a 3 of the 4
# data-parallel slots and b 1: on 4 nodes a's level-1 experts span nodes 0-2 and b's are node 3's own, so with
# units by expected share DP ranks 0-2 send 4 tier-2 units each and DP rank 3 none (R = 0 and R > 0 in one EP
# group: every rank must still issue the same collectives).
MIXED_UNITS = {"ep4_2tier_rre"}

# name: (workers, tp, ep, router, overlap, groupwise)
CASES = {
    "ep2_locmoe": (2, 1, 2, "locmoe", 1, True),
    "ep2_switch": (2, 1, 2, "switch", 2, True),  # overlap: 2 chunks
    "ep2_hash": (2, 1, 2, "hash", 1, True),
    "ep2_rre": (2, 1, 2, "rre", 1, True),
    # from the seed, dropout on; TP2 x EP2 also group-wise over both nodes and with optimizer-state sharding
    "tp2_seed": (2, 2, 1, "locmoe", 1, True),
    "tp2_ep2_seed": (4, 2, 2, "locmoe", 1, True),
    # two-tier exchange + domain-affine placement: nodes {0, 1} and {2, 3}
    "ep4_2tier_locmoe": (4, 1, 4, "locmoe", 1, True),
    "ep4_2tier_switch": (4, 1, 4, "switch", 2, True),  # overlap: 2 chunks through both tiers; rerouting
    "ep4_2tier_hash": (4, 1, 4, "hash", 3, True),  # 3 chunks (u = 3 rows, OPTIONS)
    "ep4_2tier_rre": (4, 1, 4, "rre", 1, True),
    "tp2_ep2_2tier": (4, 2, 2, "locmoe", 1, True),
    # optimizer-state sharding (ZeRO-1) over DP2 (the experts' moments sharded too: every rank holds all experts)
    "dp2_zero": (2, 1, 1, "locmoe", 1, True),
    # gradient accumulation (2 micro-batches of 1 sequence per rank) with EP2 exchanges and ZeRO-1
    "ep2_zero_accum": (2, 1, 2, "locmoe", 1, True),
}
# Extra config fields of a case. The two-tier cases with one unit per remote expert (switch, hash) drop in the
# remote tier (C_r = 2 of 8 tokens; hash 3); locmoe and rre send units of 1 row by the pairs' expected shares.
# The single-process reference ignores optimizer_shard: it is the unsharded run the sharded msrun
# run must equal.
TWO_TIER = {"moe": {"remote_capacity_factor": 1.0}, "data": {"placement": "domain_affine"}}
# EP 4 on 4 nodes of one device: a domain's level-1 experts span two nodes, so tier 2 carries the placement's
# units (the TP 2 x EP 2 case keeps 2 devices per node: every rank's domain experts are on its node, no units)
TWO_TIER_4_NODES = {**TWO_TIER, "parallel": {"devices_per_node": 1}}
OPTIONS = {
    **{name: TWO_TIER_4_NODES if name.startswith("ep4") else TWO_TIER for name in CASES if "2tier" in name},
    "ep4_2tier_hash": {**TWO_TIER_4_NODES, "moe": {"remote_capacity_factor": 1.5}},  # u = ceil(8 * 1.5 / 4) = 3
    # the remote overflow (C_r = 2 of 8 tokens) rerouted to free node-local slots (moe.reroute_overflow)
    "ep4_2tier_switch": {**TWO_TIER_4_NODES, "moe": {"remote_capacity_factor": 1.0, "reroute_overflow": True}},
    "dp2_zero": {"parallel": {"optimizer_shard": True}},
    # with dropout: the micro-batches draw step * 2 + micro-batch index
    "ep2_zero_accum": {"parallel": {"optimizer_shard": True}, "train": {"gradient_accumulation_steps": 2},
                       "model": {"dropout_rate": 0.1}},
    # dropout on: every mask is a hash of the global position (pangu_sigma.parallel.dropout), so TP ranks agree
    # on the replicated tensors and the layouts draw the single process's masks
    "tp2_seed": {"model": {"dropout_rate": 0.1}},
    # parallel.a2a_group servers (HCCL's AlltoAll rule): the EP groups {0, 2}, {1, 3} span both nodes, so the
    # inter-node All-to-All(V) runs over all 4 ranks with zero blocks between the two EP groups; ZeRO-1 over
    # each TP rank's DP pair, resumed from its per-rank checkpoints
    "tp2_ep2_seed": {"model": {"dropout_rate": 0.1},
                     "parallel": {"a2a_group": "servers", "optimizer_shard": True}},
    "tp2_ep2_2tier": {**TWO_TIER, "parallel": {"a2a_group": "servers"}},
}
# Started from the seed (pangu_sigma.parallel.init_weights) instead of a shared full initial checkpoint.
SEED_CASES = {"tp2_seed": 4321, "tp2_ep2_seed": 4321}


def case_config(name, output_dir):
    from pangu_sigma.config import config_from_dict

    workers, tp, ep, router, overlap, groupwise = CASES[name]
    raw = {
        "model": {"seq_length": SEQ, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
                  "moe_layer_num": 1},
        "moe": {"router": router, "expert_num_per_dp_dim": EXPERTS // ep, "capacity_factor": float(EXPERTS),
                "locality_loss_coef": 0.01,
                "num_domain_groups": 2 if router == "rre" or (router == "locmoe" and "2tier" in name) else 1},
        "parallel": {"op_level_model_parallel_num": tp, "expert_parallel": ep, "devices_per_node": 2,
                     "comm_overlap_degree": overlap, "groupwise_a2a": groupwise, "virtual_world_size": workers,
                     # seed cases: 4 KiB gradient buckets, so the reduction runs in many buckets (some of one
                     # gradient, unpacked; in tp2_ep2_seed with ZeRO-1); the others: the default, one bucket per
                     # replica group
                     "grad_bucket_mb": 4 / 1024 if name in SEED_CASES else 256.0},
        "data": {"dataset_dir": output_dir},
        "train": {"batch_size": GLOBAL_BATCH // (workers // tp), "sink_size": 1, "train_steps": STEPS,
                  "output_dir": output_dir},
        "optim": {"lr": 0.01, "min_lr": 0.001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1,
                  "adam_eps": 1e-6},
    }
    for section, values in OPTIONS.get(name, {}).items():
        raw[section].update(values)
    return config_from_dict(raw)


def topology_of(name, rank):
    workers, tp, ep = CASES[name][:3]
    per_node = OPTIONS.get(name, {}).get("parallel", {}).get("devices_per_node", 2)
    return Topology(world_size=workers, tp=tp, ep=ep, num_experts=EXPERTS, devices_per_node=per_node, rank=rank)


def meta_of(name):
    """The dataset meta of a case: domains 3:1 for MIXED_UNITS, else 1:1."""
    if name not in MIXED_UNITS:
        return META
    return {**META, "domain_samples": {"a": {"train": 30, "valid": 1}, "b": {"train": 10, "valid": 1}}}


def global_batch(name=None, seed=7):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1)).astype(np.int32)  # [B, S+1]
    share_a = 3 if name in MIXED_UNITS else 2  # samples of domain a, first: as the placement reads them
    domains = (np.arange(GLOBAL_BATCH) >= share_a).astype(np.int32)  # [B]
    return ids, domains


def params_of(net):
    """Every parameter of the model (the router tables too), by name."""
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def load_params(net, values):
    for p in net.get_parameters():
        p.set_data(ms.Tensor(values[p.name]))


def run_one(step_cell, ids, domains, groups=1):
    """One optimizer step on a batch of `groups` token groups (as the accumulating step's micro-batches
    when the cell accumulates gradients: each group's rows cut in order, pangu_sigma.data.dataset)."""
    k = getattr(step_cell, "accumulation_steps", 1)
    if k == 1:
        step_cell(ms.Tensor(ids), ms.Tensor(domains))
        return
    from pangu_sigma.data.dataset import split_micro_batches
    step_cell.run_step([(ms.Tensor(i), ms.Tensor(d)) for i, d in zip(split_micro_batches(ids, k, groups),
                                                                       split_micro_batches(domains, k, groups))])


def run_steps(step_cell, ids, domains, groups=1):
    """STEPS optimizer steps on one batch -> (the logged (world-mean) loss of each step,
    the logged routing counts {'dropped': [STEPS, M, 2] by tier, 'local': [STEPS, M, dp] by rank})."""
    losses, dropped, local = [], [], []
    for _ in range(STEPS):
        run_one(step_cell, ids, domains, groups)
        losses.append(float(step_cell.metrics_scalars.asnumpy()[0, 0]))
        dropped.append(step_cell.metrics_dropped.asnumpy()[0])
        local.append(step_cell.metrics_local.asnumpy()[0])
    return losses, {"dropped": np.stack(dropped), "local": np.stack(local)}


def build(name, ctx, output_dir, token_groups=1, group_ranks=None):
    from pangu_sigma.training.train import build_train_step

    ms.set_seed(11)
    return build_train_step(case_config(name, output_dir), meta_of(name), ctx, token_groups, group_ranks)


def reference(name, output_dir):
    """Single process: dp token groups posing as the ranks. -> (initial params, losses, final params, stats,
    the unsharded optimizer's Adam moments {adam_m./adam_v.<name>: array})."""
    workers, tp = CASES[name][:2]
    dp = workers // tp
    ctx = ParallelContext(topology_of(name, 0), "emulated", distributed=False)
    step_cell, net = build(name, ctx, output_dir, token_groups=dp, group_ranks=[d * tp for d in range(dp)])
    if name in SEED_CASES:
        from pangu_sigma.parallel.init_weights import initialise
        initialise(net, SEED_CASES[name], case_config(name, output_dir).model)
    initial = params_of(net)
    losses, stats = run_steps(step_cell, *global_batch(name), groups=dp)
    moments = {p.name: p.asnumpy().copy() for p in step_cell.get_parameters() if p.name.startswith("adam_")}
    return initial, losses, params_of(net), stats, moments
