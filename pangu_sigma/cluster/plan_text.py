"""plan's text output: the plan dict (pangu_sigma.cluster.plan.make_plan) as the lines the CLI prints."""

from pangu_sigma.cluster import param_count

MAX_LISTED = 6  # groups / nodes printed before abbreviating


# ---- text -------------------------------------------------------------------------
def remote_text(p):
    """The remote tier's capacity in words: C_r per pair, or units of u rows by expected share."""
    if p["remote_quanta"] == 1:
        return f"C_r {p['remote_capacity']}"
    return (f"{p['remote_quanta']} units of {p['remote_capacity']} rows for an expected 1/E share (each pair "
            f"in proportion to its share under the domain-affine placement, none where it is 0)")


def fmt_ranks(ranks):
    """[0,1,2,3] -> '0-3'; [0,8,16,24] -> '0..24/8'; else a comma list, shortened."""
    ranks = list(ranks)
    if len(ranks) == 1:
        return str(ranks[0])
    step = ranks[1] - ranks[0]
    if len(ranks) > 2 and step > 0 and all(b - a == step for a, b in zip(ranks, ranks[1:])):
        return f"{ranks[0]}-{ranks[-1]}" if step == 1 else f"{ranks[0]}..{ranks[-1]}/{step}"
    if len(ranks) > 8:
        return ",".join(map(str, ranks[:6])) + f",...,{ranks[-1]}"
    return ",".join(map(str, ranks))


def _abbreviated(items, keep=MAX_LISTED):
    if len(items) <= keep:
        return items, 0
    return items[:keep - 1] + [items[-1]], len(items) - keep


def _gib(nbytes):
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if nbytes >= 1024 ** power:
            return f"{nbytes / 1024 ** power:.2f} {unit}"
    return f"{nbytes} B"


def _human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else str(n)


def format_text(plan, config_path):
    p = plan
    lines = [f"plan for {config_path}",
             f"cluster    {p['world_size']} devices = {p['nodes']} nodes x up to {p['devices_per_node']} "
             f"devices (from {p['source']})",
             f"parallel   tp {p['tp']} (op_level_model_parallel_num) x dp {p['dp']}; "
             f"ep {p['ep']} (expert_parallel), expert-dp {p['edp']}",
             f"experts    {p['num_experts']} per sparse layer ({p['moe_layer_num']} layers, router {p['router']}); "
             f"{p['experts_per_rank']} per rank"
             + (f", each split {p['tp']} ways over its TP group; " if p["tp"] > 1 else "; ")
             + f"{p['local_experts_per_node']} node-local per node"]
    lines.append("groups")
    for kind in ("tp", "dp", "ep", "edp"):
        groups = p["groups"][kind]
        shown, hidden = _abbreviated(groups, 4)
        text = " ".join(f"[{fmt_ranks(g)}]" for g in shown[:-1])
        text += (f" ... ({hidden} more) " if hidden else " ") + f"[{fmt_ranks(shown[-1])}]"
        lines.append(f"  {kind:<4} {len(groups)} x {len(groups[0])}: {text.strip()}")
    lines.append("placement  node: ranks -> experts held (node-local experts = every expert on the node)")
    rows = []
    for node, (ranks, local) in enumerate(zip(p["ranks_of_node"], p["experts_of_node"])):
        runs, start = [], 0
        for i in range(1, len(ranks) + 1):
            if i == len(ranks) or p["experts_of_rank"][ranks[i]] != p["experts_of_rank"][ranks[start]]:
                runs.append(f"{fmt_ranks(ranks[start:i])} -> {p['experts_of_rank'][ranks[start]]}")
                start = i
        rows.append(f"  node {node:<3} ranks {'; '.join(runs)}; node-local {local}")
    shown, hidden = _abbreviated(rows)
    lines += shown[:-1] + ([f"  ... ({hidden} more nodes)"] if hidden else []) + shown[-1:]
    lines.append(f"data       placement {p['placement']}"
                 + (" (every rank reads blocks of one permutation of all domains)" if not p["domain_map"] else ""))
    lines += [f"  {line}" for line in p["domain_map"] or []]
    mem = p["memory_breakdown_gib"]
    lines += [
        f"params     total {p['params_total']:,} ({_human(p['params_total'])}), active per token "
        f"{p['params_active']:,} ({_human(p['params_active'])}), per device {p['params_per_device']:,} "
        f"({_human(p['params_per_device'])})"
        + (f"; + {p['params_non_trainable']:,} fixed table entries" if p["params_non_trainable"] else ""),
        f"memory     {p['memory_per_device_gib']:.2f} GiB per device (budget {p['memory_budget_gib']} GiB: "
        f"{'fits' if p['memory_fits'] else 'DOES NOT FIT'}, margin {p['memory_margin_gib']:.2f}, keep >= "
        f"{param_count.MARGIN_GIB} for what is not modelled: {', '.join(param_count.UNMODELLED)}); "
        f"fp32 weights, {p['compute_dtype']} compute, "
        f"recompute {p['recompute']}, optimizer_shard {str(p['optimizer_shard']).lower()}",
        f"  persistent  parameters {mem['parameters']:.2f} + gradients {mem['gradients']:.2f} "
        + (f"+ gradient accumulation buffer {mem['grad_accumulation']:.2f} " if mem["grad_accumulation"] else "")
        + f"+ Adam moments {mem['optimizer']:.2f} + HCCL workspace {mem['hccl_workspace']:.2f} "
        f"({p['hccl_groups']} groups x 2 x {p['hccl_buffsize_mb']} MB, parallel.hccl_buffsize_mb)",
        f"  fwd/bwd     activations {mem['activations']:.2f} ("
        + ", ".join(f"{k} {v:.2f}" for k, v in p["activation_parts_gib"].items())
        + f") + all-to-all buffers {mem['a2a_buffers']:.2f} + grad bucket {mem['grad_bucket']:.2f} "
        f"(2 x parallel.grad_bucket_mb)",
        f"  optimizer   sharded-update gather buffer {mem['zero_gather']:.2f} (peak = persistent + the larger phase)",
        f"batch      global batch {p['global_batch']} sequences ({p['global_batch_tokens']:,} tokens) = "
        f"{p['batch_per_dp_rank']} per data-parallel rank (train.batch_size) x dp {p['dp']}; "
        f"micro-batch {p['micro_batch_per_dp_rank']} x {p['gradient_accumulation_steps']} accumulation steps "
        f"(train.gradient_accumulation_steps)",
        f"  routing   per micro-batch: {p['tokens_per_rank']:,} tokens per rank; expert capacity {p['expert_capacity']}"
        + (f" per (rank, node-local expert), {remote_text(p)} per (rank, expert on another node) "
           f"(two-tier exchange)" if p["a2a_detail"]["two_tier"] else ""),
    ]
    d, per, world = p["a2a_detail"], p["a2a_bytes_per_step"], p["a2a_bytes_per_step_world"]
    buffer = f"[E {p['num_experts']}, C {p['expert_capacity']}, d] = {_gib(d['buffer_bytes'])}"
    how = (f"group-wise: each TP rank sends its [E, {d['rows_per_rank']}, d] slice "
           f"({_gib(d['sent_bytes_per_call'])}) through EP, then a TP AllGather"
           if d["groupwise"] else "each rank sends all of it through EP")
    if d["two_tier"]:
        buffer = (f"node-local experts x C {p['expert_capacity']} (intra-node All-to-All) + the others at "
                  f"{remote_text(p)} (EP AllToAllV, the only rows leaving the node)")
        how = "group-wise TP slices per tier" if d["groupwise"] else "whole tiers"
    lines += [
        f"all-to-all {d['calls_per_step']} per step (4 per MoE layer per micro-batch: fwd dispatch + combine, "
        f"bwd both); "
        f"buffer {buffer}; {how}",
        f"  per device  intra-node {per['intra']:,} B ({_gib(per['intra'])}), "
        f"inter-node {per['inter']:,} B ({_gib(per['inter'])})",
        f"  all devices intra-node {world['intra']:,} B ({_gib(world['intra'])}), "
        f"inter-node {world['inter']:,} B ({_gib(world['inter'])})",
        f"  recompute {p['recompute']} sends again per device: MoE exchange 0 B (kept), TP row-linear AllReduces "
        f"intra-node {_gib(d['recompute_resent']['intra'])}, inter-node {_gib(d['recompute_resent']['inter'])}",
    ]
    for name, b in d["by_collective"].items():
        lines.append(f"  {name:<13} per device intra {_gib(b['intra'])}, inter {_gib(b['inter'])}")
    h = p["hccl"]
    lines.append(f"hccl       {h['groups']} groups, names up to {h['max_name_bytes']} bytes; "
                 + ("910A group rules and the 127-byte name limit hold; " if h["checked"]
                    else "910A rules not checked (parallel.device_target is not Ascend)")
                 + ("" if not h["checked"] else
                    f"AlltoAll(V) rule BROKEN by {len(h['alltoall_violations'])} of {h['alltoall_groups']} exchange "
                    f"groups (see the note)" if h["alltoall_violations"] else
                    f"AlltoAll(V) rule (whole HCCS halves across servers) holds for {h['alltoall_groups']} exchange groups"))
    lines += [f"note       {n}" for n in p["notes"]]
    return "\n".join(lines)
