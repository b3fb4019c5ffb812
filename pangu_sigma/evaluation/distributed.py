"""Evaluation on the training layout, under the training launchers (msrun, rank tables):

    msrun ... python -m pangu_sigma.evaluation.distributed --config FILE --checkpoint PATH [--json FILE]

Every rank builds its slice of the model on the config's layout (TP, EP, DP, as in training), loads
its shards of the checkpoint (any layout, resharded on the fly) and routes its data-parallel rank's
block of each global batch: the rows and the token group training gives that rank. eval.evaluate then
runs unchanged on the gathered figures: per batch, every data-parallel rank's per-token cross-entropy
and routing are placed at its rows of a zero buffer and summed over the world (TP rank 0 of each
data-parallel group contributes; adding zeros is exact), so each rank holds what a single process
posing as the cluster (parallel.virtual_scope: cluster) computes for that batch, and the figures are
those of the single-process eval of the merged checkpoint. Rank 0 logs and writes --json.
"""
import dataclasses
import sys

import numpy as np

from locmoe.errors import ConfigError


class _WorldSum:
    """numpy float32 array -> its sum over every rank (one AllReduce over the world group, the same on
    every rank; a cell per shape, as GRAPH mode compiles one per shape anyway)."""

    def __init__(self, topology, backend):
        self.topology, self.backend, self.cells = topology, backend, {}

    def __call__(self, array):
        import mindspore as ms
        from mindspore import nn

        from locmoe.comm import AllReduce

        key = array.shape
        if key not in self.cells:
            class Sum(nn.Cell):
                def __init__(self, reduce):
                    super().__init__()
                    self.reduce = reduce

                def construct(self, x):
                    return self.reduce(x)

            name = f"eval_world_sum_{len(self.cells)}"
            self.cells[key] = Sum(AllReduce(list(range(self.topology.world_size)), self.backend, self.topology,
                                            name))
        return self.cells[key](ms.Tensor(np.ascontiguousarray(array, np.float32))).asnumpy()


def gather_rows(world_sum, topology, row):
    """Every data-parallel rank's `row` (numpy, same shape on every rank) -> [dp, *row.shape] in DP order."""
    buffer = np.zeros((topology.dp,) + row.shape, np.float32)
    if topology.tp_rank() == 0:
        buffer[topology.dp_rank()] = row
    return world_sum(buffer)


@dataclasses.dataclass
class _TableView:
    """A [dp, E] table gathered over the data-parallel ranks, read as MoELayer's own [G, E] tensor."""
    table: np.ndarray

    def asnumpy(self):
        return self.table


class LayerView:
    """One MoE layer of the cluster as eval.evaluate reads it: the rank's layer for the per-group
    geometry (capacity, tiers), with the [G, E] tables of every data-parallel rank (G = dp)."""

    def __init__(self, layer, world_sum, topology):
        self.layer = layer
        self.token_groups = topology.dp
        self.two_tier, self.reroute = layer.two_tier, layer.reroute
        self.local_mask = _TableView(gather_rows(world_sum, topology, layer.local_mask.asnumpy()[0]))  # [G, E]
        if layer.two_tier:
            self.remote_quanta, self.max_pair_units = layer.remote_quanta, layer.max_pair_units
            self.group_units = _TableView(gather_rows(world_sum, topology, layer.group_units.asnumpy()[0]))

    def capacity(self, tokens_per_group):
        return self.layer.capacity(tokens_per_group)

    def remote_capacity(self, tokens_per_group):
        return self.layer.remote_capacity(tokens_per_group)

    def buffer_rows(self, tokens_per_group):
        """MoELayer.buffer_rows over the cluster: the tier-2 units of the busiest data-parallel rank."""
        if not self.two_tier:
            return self.layer.buffer_rows(tokens_per_group)
        units = int(self.group_units.asnumpy().sum(1).max())  # R of the busiest group
        return (self.layer.num_local * self.layer.capacity(tokens_per_group)
                + units * self.layer.remote_capacity(tokens_per_group))


class GatheredForward:
    """eval_forward_cell's interface on the cluster: (ids [B, S+1], domains [B]) of a global batch ->
    (nll [B, S], per MoE layer (expert_index [dp, T], keep [dp, T])), each rank computing its DP block."""

    def __init__(self, net, world_sum, topology):
        from pangu_sigma.evaluation.eval_forward import eval_forward_cell

        vocab_ce = net.cross_entropy if topology.tp > 1 else None  # TP: the logits hold a vocabulary slice
        self.cell, self.world_sum, self.topology = eval_forward_cell(net.model, vocab_ce), world_sum, topology

    def __call__(self, ids, domains):
        from mindspore import Tensor

        ids, domains = ids.asnumpy(), domains.asnumpy()
        rows = len(ids) // self.topology.dp  # [b] rows of each data-parallel rank
        mine = slice(self.topology.dp_rank() * rows, (self.topology.dp_rank() + 1) * rows)
        nll, routing = self.cell(Tensor(ids[mine]), Tensor(domains[mine]))  # [b, S]; ([1, T], [1, T]) each
        parts = [nll.asnumpy().reshape(-1)] + [np.asarray(t.asnumpy(), np.float32).reshape(-1)
                                               for pair in routing for t in pair]
        sizes = [len(p) for p in parts]
        full = gather_rows(self.world_sum, self.topology, np.concatenate(parts))  # [dp, sum sizes]
        pieces = np.split(full, np.cumsum(sizes)[:-1], axis=1)  # each [dp, size]
        nll_full = Tensor(pieces[0].reshape(len(ids), -1))  # [B, S]: DP blocks in order
        pairs = tuple((Tensor(pieces[1 + 2 * m].astype(routing[m][0].asnumpy().dtype)),
                       Tensor(pieces[2 + 2 * m].astype(routing[m][1].asnumpy().dtype)))
                      for m in range(len(routing)))  # ([dp, T], [dp, T]) per layer
        return nll_full, pairs


@dataclasses.dataclass
class TrainingLayout:
    """What eval.evaluate needs to run on a launched cluster instead of one process."""
    meta: dict
    layout: dict
    moe_layers: list
    forward: GatheredForward
    rank: int


def training_layout(cfg, checkpoint_path, allow_changes=()):
    """(net, TrainingLayout) of this rank: communication initialised, the model built on the config's
    layout at eval's capacity factor, this rank's shards of the checkpoint loaded."""
    from pangu_sigma.build import build_model, dataset_meta, launched_distributed, parallel_context, set_device
    from pangu_sigma.evaluation.eval import eval_capacity_factor
    from pangu_sigma.training import checkpoint

    if not launched_distributed():
        raise ConfigError("launcher", "none", "msrun or a rank table launch (run_scripts/run_msrun.sh); a single "
                                              "process evaluates with python -m pangu_sigma.evaluation.eval")
    set_device(cfg)
    meta = dataset_meta(cfg, checksums=False)
    ctx = parallel_context(cfg)
    topology = ctx.topology
    factor, _ = eval_capacity_factor(cfg)
    eval_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=factor))
    net = build_model(eval_cfg, meta, topology, parallel=ctx)
    checkpoint.load_model_for_inference(net, cfg, checkpoint_path, allow_changes, topology=topology)
    net.set_train(False)
    world_sum = _WorldSum(topology, ctx.backend)
    model = net.model
    layers = [model.blocks[i].ffn for i in range(model.dense_layer_num, model.dense_layer_num + model.moe_layer_num)]
    layout = {"scope": "cluster", "token_groups": topology.dp, "group_ranks": [d * topology.tp
                                                                              for d in range(topology.dp)],
              "batch_multiplier": topology.dp, "world_size": topology.world_size, "topology": topology}
    views = [LayerView(layer, world_sum, topology) for layer in layers]
    return net, TrainingLayout(meta, layout, views, GatheredForward(net, world_sum, topology), topology.rank)


def main(argv=None):
    """eval's command line (pangu_sigma.evaluation.eval.main), evaluated on the launched cluster."""
    from pangu_sigma.evaluation.eval import main as eval_main

    def on_cluster(*args, **kwargs):
        result, rank = evaluate_on_cluster(*args, **kwargs)
        return result if rank == 0 else None  # rank 0 writes --json

    return eval_main(argv, on_cluster, prog="python -m pangu_sigma.evaluation.distributed")


def evaluate_on_cluster(cfg, checkpoint_path, batch_size=None, split="valid", log=print, allow_changes=(),
                        **options):
    """eval.evaluate on the training layout -> (figures, this rank): every rank holds the same figures,
    rank 0 alone logs them."""
    from pangu_sigma.evaluation.eval import evaluate

    net, on_layout = training_layout(cfg, checkpoint_path, allow_changes)
    quiet = log if on_layout.rank == 0 else (lambda *_: None)
    result = evaluate(cfg, batch_size=batch_size, split=split, net=net, log=quiet, on_layout=on_layout, **options)
    return result, on_layout.rank


def json_safe(value):
    """The figures as plain JSON values (numpy arrays and scalars to lists and numbers)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


if __name__ == "__main__":
    sys.exit(main())
