"""From a RunConfig (+ the prepared dataset's meta.json) to topology, model and loss cell.

Shared by train, eval, generate and the tools, so they all build the same network.
"""
import dataclasses
import functools
import os

import numpy as np
import mindspore as ms

from locmoe.comm import create_topology_groups, resolve_backend
from locmoe.errors import ConfigError
from locmoe.layer import MoELayer
from locmoe.parallel_context import ParallelContext
from locmoe.placement import plan_placement, striped_level1_groups, tier_units
from locmoe.topology import Topology
from pangu_sigma.data.dataset import read_meta
from pangu_sigma.model import PanguSigmaModel, PanguSigmaWithLoss


def ascend_backend_error():
    """None if this MindSpore can load its Ascend backend, else the loader's first error line.

    mindspore/device_context/ascend/device.py (is_available): plugins are loaded at
    `import mindspore`; MSContext.is_pkg_support_device("Ascend") says whether the
    Ascend one loaded and load_plugin_error() why not (e.g. libge_runner.so missing
    when CANN is not installed or its set_env.sh not sourced).
    """
    from mindspore._c_expression import MSContext
    context = MSContext.get_instance()
    if context.is_pkg_support_device("Ascend"):
        return None
    lines = [line for line in context.load_plugin_error().splitlines() if line.strip()]
    return lines[0] if lines else "no Ascend plugin in this package"


def device_id_from_env(environ=None):
    """DEVICE_ID: the *logical* NPU index this process may use (0..visible NPUs - 1).

    CANN's aclrtSetDevice (AscendCL API reference, "set_device") takes an index in
    [0, number of available devices - 1]: inside a container that sees NPUs 4-7
    those are 0-3. The launchers export the logical index (run_distribute_train.sh
    maps the rank table's physical device_id through ASCEND_VISIBLE_DEVICES).
    """
    environ = os.environ if environ is None else environ
    text = environ.get("DEVICE_ID", "0")
    if not text.isdigit() or int(text) > 7:
        raise ConfigError("DEVICE_ID", text, "the logical NPU index of this process, an integer in 0..7")
    return int(text)


def set_device(cfg, mode=ms.GRAPH_MODE, backend_error=ascend_backend_error):
    """Execution mode and device; Ascend reads DEVICE_ID (logical index) from the environment.

    On a MindSpore installation without a usable Ascend backend, device_target
    Ascend is a one-line ConfigError (instead of MindSpore's stack trace).
    """
    ms.set_context(mode=mode)
    if cfg.parallel.device_target == "Ascend":
        error = backend_error()
        if error is not None:
            raise ConfigError("parallel.device_target", "Ascend",
                              f"CPU: this MindSpore {ms.__version__} installation has no usable Ascend backend "
                              f"({error}); for Ascend install CANN and the matching MindSpore Ascend wheel and "
                              f"source CANN's set_env.sh")
        ms.set_device("Ascend", device_id_from_env())
    else:
        ms.set_device("CPU")


def dataset_meta(cfg, checksums=True):
    """meta.json of cfg.data.dataset_dir, checked against the model config (checksums: also every shard's
    sha256; a distributed run passes False and lets one rank hash, pangu_sigma.data.verify)."""
    meta = read_meta(cfg.data.dataset_dir, checksums)
    if meta["seq_length"] != cfg.model.seq_length:
        raise ConfigError("model.seq_length", cfg.model.seq_length,
                          f"{meta['seq_length']}, the sample length of {cfg.data.dataset_dir}")
    if cfg.model.vocab_size not in (0, meta["vocab_size"]):
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"0 or {meta['vocab_size']}, the vocabulary of {cfg.data.dataset_dir}")
    return meta


def single_process_topology(cfg):
    """The topology this process routes with: the virtual cluster rank, or a lone rank."""
    par = cfg.parallel
    if par.virtual_world_size:
        return Topology(world_size=par.virtual_world_size, tp=par.op_level_model_parallel_num,
                        ep=par.expert_parallel, num_experts=cfg.num_experts,
                        devices_per_node=par.devices_per_node, rank=par.virtual_rank)
    if par.expert_parallel > 1 or par.op_level_model_parallel_num > 1:
        raise ConfigError("parallel.expert_parallel", par.expert_parallel,
                          "1 in a single process (multi-process runs: run_scripts/run_msrun.sh; or set "
                          "parallel.virtual_world_size to pose as one rank of a cluster)")
    return Topology(world_size=1, tp=1, ep=1, num_experts=cfg.num_experts, devices_per_node=1)


def single_process_groups(cfg, topology):
    """(token_groups, group_ranks, batch multiplier) of a single process.

    parallel.virtual_scope=cluster: one token group per data-parallel rank of the
    virtual cluster (its TP rank 0), and the batch of all of them; else one group.
    """
    if cfg.parallel.virtual_world_size and cfg.parallel.virtual_scope == "cluster":
        return topology.dp, [d * topology.tp for d in range(topology.dp)], topology.dp
    return 1, None, 1


def launched_distributed():
    """True when started by msrun (MS_WORKER_NUM) or a rank table launcher (RANK_TABLE_FILE + RANK_SIZE > 1)."""
    if "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ:
        return True
    return "RANK_TABLE_FILE" in os.environ and int(os.environ.get("RANK_SIZE", "1")) > 1


def export_hccl_buffsize(cfg, environ=os.environ):
    """HCCL_BUFFSIZE = parallel.hccl_buffsize_mb for the communicators init() creates (Ascend): MindSpore's
    Ascend collective plugin reads the variable from the process environment (mindspore/lib/plugin/ascend/
    libd_collective.so and lib/libmindspore_core.so hold the string "HCCL_BUFFSIZE"; the latter warns
    "Setting HCCL_BUFFSIZE too small may result in poor performance"). A different value already in the
    environment is an error: plan's memory figures would not be the run's."""
    if cfg.parallel.device_target != "Ascend":
        return
    wanted, present = str(cfg.parallel.hccl_buffsize_mb), environ.get("HCCL_BUFFSIZE")
    if present not in (None, wanted):
        raise ConfigError("parallel.hccl_buffsize_mb", cfg.parallel.hccl_buffsize_mb,
                          f"the HCCL_BUFFSIZE set in the environment ({present}), or unset HCCL_BUFFSIZE")
    environ["HCCL_BUFFSIZE"] = wanted


def parallel_context(cfg):
    """This process's ParallelContext: initialises communication when launched distributed.

    Node membership comes from RANK_TABLE_FILE when set, else from parallel.devices_per_node.
    """
    if not launched_distributed():
        return ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
    from mindspore.communication import get_group_size, get_rank, init

    export_hccl_buffsize(cfg)
    init()
    rank, world = get_rank(), get_group_size()
    if os.environ.get("RANK_TABLE_FILE") and os.environ.get("RANK_ID", str(rank)) != str(rank):
        # a rank-table launch: the table's rank (RANK_ID) must be the communicator's rank
        raise ConfigError("RANK_ID", os.environ["RANK_ID"],
                          f"the rank the communicator gave this process ({rank} of {world})")
    par = cfg.parallel
    node_of_rank = device_of_rank = None
    if os.environ.get("RANK_TABLE_FILE"):
        from pangu_sigma.cluster.ranktable import load_rank_table

        table = load_rank_table(os.environ["RANK_TABLE_FILE"], rank_size=world)
        node_of_rank, device_of_rank = table.node_of_rank, table.device_id_of_rank
    topology = Topology(world_size=world, tp=par.op_level_model_parallel_num, ep=par.expert_parallel,
                        num_experts=cfg.num_experts, devices_per_node=par.devices_per_node, rank=rank,
                        node_of_rank=node_of_rank)
    backend = resolve_backend(par.comm_backend, par.device_target)
    create_topology_groups(topology, device_of_rank)  # under HCCL: the 910A group rules first
    return ParallelContext(topology, backend, distributed=True)


def token_counts(cfg):
    """Train-split token frequencies for the hash router, or None if the data has none."""
    path = os.path.join(cfg.data.dataset_dir, "token_counts.npy")
    return np.load(path) if os.path.isfile(path) else None


def domain_sizes(meta, split="train"):
    """Samples per domain of a prepared split, in domain-id order. # [D]"""
    return [int(meta["domain_samples"][name][split]) for name in meta["domains"]]


def domain_placement(cfg, meta, topology):
    """The locmoe.placement.DomainPlacement of data.placement=domain_affine on `topology`, else None."""
    if cfg.data.placement != "domain_affine":
        return None
    return plan_placement(domain_sizes(meta), topology, cfg.train.batch_size)


def capacity_multiple(cfg, topology):
    """The rows every capacity is rounded up to a multiple of: TP in group-wise mode (MoELayer)."""
    return topology.tp if cfg.parallel.groupwise_a2a and topology.tp > 1 else 1


def level1_source(cfg, placement):
    """Where the routers' level-1 mask comes from: 'placement' (the domain-affine placement's own experts
    per domain), 'every_expert' (i.i.d. data, moe.iid_level1 none), 'node_striped' (i.i.d. data, the
    node-striped groups), 'router_blocks' (the routers' contiguous blocks, locmoe.routers.
    level1_domain_experts) or None (one group: no level 1). The last two read moe.domain_to_group."""
    if placement is not None:
        return "placement"
    if cfg.moe.iid_level1 == "none":
        return "every_expert"
    if cfg.moe.num_domain_groups == 1:
        return None
    return "node_striped" if cfg.moe.iid_level1 == "node_striped" else "router_blocks"


def level1_experts(cfg, placement, topology):
    """The [D, E] level-1 mask the routers get (by level1_source); None: the routers' own contiguous
    blocks, or no level 1."""
    source = level1_source(cfg, placement)
    if source == "placement":
        return placement.domain_experts
    if source == "every_expert":
        return np.ones((1, cfg.num_experts), np.float32)  # [1, E]: level 1 allows every expert
    if source != "node_striped":
        return None
    groups = striped_level1_groups(cfg.moe.num_domain_groups, topology)  # [groups, E]
    return groups[np.asarray(cfg.moe.domain_to_group, np.int64)] if cfg.moe.domain_to_group else groups


def check_domain_map(cfg, domains, placement):
    """A ConfigError when level 1 reads moe.domain_to_group (level1_source) and the map lists fewer groups
    than the dataset's domains; a map that level 1 does not read is not checked."""
    reads_map = level1_source(cfg, placement) in ("node_striped", "router_blocks")
    if cfg.moe.domain_to_group and reads_map and len(cfg.moe.domain_to_group) < domains:
        raise ConfigError("moe.domain_to_group", list(cfg.moe.domain_to_group),
                          f"one group per domain of {cfg.data.dataset_dir} ({domains} domains)")


def placement_sample_order(cfg, placement, dp_ranks):
    """BatchStream's sample_order for the reader of `dp_ranks` under `placement` (None: i.i.d.)."""
    if placement is None:
        return None
    from pangu_sigma.data.placement_order import read_order

    ranks, seed, shuffle = list(dp_ranks), cfg.data.seed, cfg.data.shuffle

    def sample_order(domain_ids, epoch):
        return read_order(domain_ids, placement, ranks, seed, epoch, shuffle)

    return sample_order


def build_model(cfg, meta, topology, with_loss=True, parallel=None, token_groups=1, group_ranks=None,
                reads_by_placement=True):
    """PanguSigmaModel (wrapped with its loss if with_loss) for this config and dataset.

    parallel: the ParallelContext of a distributed run (None: single process).
    token_groups / group_ranks: a single process routing as several ranks (see MoELayer).
    reads_by_placement: the token groups read their ranks' domains (training, cluster-scope eval),
    so the remote tier's capacity follows their domains' level-1 experts (locmoe.placement.
    tier_units); False for a model fed any domain on any group (generation, rank-scope eval).
    """
    model_cfg = dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"], compute_dtype=cfg.compute_dtype)
    moe_cfg = cfg.moe_config(vocab_size=meta["vocab_size"]) if model_cfg.moe_layer_num > 0 else None
    counts = token_counts(cfg) if cfg.moe.router == "hash" else None
    out_std = model_cfg.param_init_std / (2.0 * model_cfg.num_layers) ** 0.5
    placement = domain_placement(cfg, meta, topology) if moe_cfg is not None else None
    if moe_cfg is not None:
        check_domain_map(cfg, len(meta.get("domains", [])), placement)
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length  # one rank's token group per micro-batch
    units, quanta = (tier_units(cfg.moe, placement, tokens, capacity_multiple(cfg, topology))
                     if reads_by_placement else (None, 1))
    factory = functools.partial(MoELayer, token_counts=counts, out_init_std=out_std, token_groups=token_groups,
                                group_ranks=group_ranks, domain_experts=level1_experts(cfg, placement, topology),
                                remote_units=units, remote_quanta=quanta)
    extra = {} if parallel is None else {"parallel": parallel}
    model = PanguSigmaModel(model_cfg, moe_cfg, topology, moe_layer_factory=factory, **extra)
    return PanguSigmaWithLoss(model) if with_loss else model
