"""Validation perplexity and expert load: python -m pangu_sigma.evaluation.eval --config FILE --checkpoint PATH.

Perplexity = exp(mean token cross-entropy over the whole valid split); every
valid sample counts (the last short batch too).

Exception: a config that trains as the image of a cluster (virtual_scope: cluster)
with data.placement=domain_affine is evaluated the same way (one token group per
data-parallel rank, each reading its node's domains, so the routing and the
capacities of each tier see what they see in training); the split is then read
in whole global batches of the placement (samples beyond the last one are left out).
"""
import math
import sys

import numpy as np

from locmoe.errors import ConfigError, OneLineArgumentParser, run_cli
from pangu_sigma.training import checkpoint
from pangu_sigma.build import (build_model, dataset_meta, domain_placement, placement_sample_order, set_device,
                               single_process_groups, single_process_topology)
from pangu_sigma.training.callbacks import expert_table
from pangu_sigma.config import load_config
from pangu_sigma.data.dataset import create_dataset


def evaluate(cfg, checkpoint_path=None, batch_size=None, split="valid", net=None, log=print):
    """Mean CE, perplexity and summed expert statistics over a split.

    Either loads checkpoint_path into a freshly built network or uses net as given.
    """
    meta = dataset_meta(cfg)
    topology = single_process_topology(cfg)
    groups, group_ranks, batch_multiplier = single_process_groups(cfg, topology)
    placed = net is None and groups > 1 and cfg.data.placement == "domain_affine"
    if net is None:
        set_device(cfg)
        net = build_model(cfg, meta, topology, token_groups=groups if placed else 1,
                          group_ranks=group_ranks if placed else None)
        checkpoint.load_into(net, checkpoint_path)
    net.set_train(False)
    if placed:  # the cluster image, reading as the placement's ranks do
        batch_size = cfg.train.batch_size * batch_multiplier
        order = placement_sample_order(cfg, domain_placement(cfg, meta, topology), range(topology.dp))
        dataset = create_dataset(cfg.data.dataset_dir, split, batch_size, shuffle=False, repeat=False,
                                 sample_order=lambda ids, epoch: order(ids, 0))
    else:
        batch_size = batch_size or cfg.train.batch_size
        batch_size = min(batch_size, meta[f"{split}_samples"])
        dataset = create_dataset(cfg.data.dataset_dir, split, batch_size, shuffle=False, repeat=False,
                                 drop_remainder=False)
    ce_sum, tokens = 0.0, 0
    load = dropped = local = None
    for ids, domains in dataset.create_tuple_iterator(num_epochs=1):
        _, ce, _, _, batch_load, batch_dropped, batch_local = net(ids, domains)
        batch_tokens = ids.shape[0] * (ids.shape[1] - 1)
        ce_sum += float(ce.asnumpy()) * batch_tokens
        tokens += batch_tokens
        if load is None:
            load, dropped, local = batch_load.asnumpy(), batch_dropped.asnumpy(), batch_local.asnumpy()
        else:
            load, dropped, local = (load + batch_load.asnumpy(), dropped + batch_dropped.asnumpy(),
                                    local + batch_local.asnumpy())
    mean_ce = ce_sum / tokens
    result = {"split": split, "tokens": tokens, "ce": mean_ce, "perplexity": math.exp(mean_ce),
              "expert_load": np.asarray(load).tolist(), "dropped": np.asarray(dropped).sum(-1).tolist(),
              "local": np.asarray(local).sum(-1).tolist(),  # [M] totals; by tier and by rank:
              "dropped_remote": np.asarray(dropped)[:, 1].tolist(), "local_by_rank": np.asarray(local).tolist()}
    log(f"[eval] {split}: {tokens} tokens, mean CE {mean_ce:.4f}, perplexity {result['perplexity']:.3f}")
    log(expert_table(load, dropped, local, first_layer=cfg.model.num_layers - cfg.model.moe_layer_num,
                     title=f"expert load on {split}"))
    return result


def main(argv=None):
    parser = OneLineArgumentParser(description="Validation perplexity and expert-load table.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help=".ckpt file or a run folder (newest checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--split", default="valid", choices=("valid", "train"))
    args = parser.parse_args(argv)
    def run():
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError("--batch-size", args.batch_size, "an integer >= 1")
        cfg = load_config(args.config, args.set)
        evaluate(cfg, args.checkpoint, args.batch_size, args.split)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
