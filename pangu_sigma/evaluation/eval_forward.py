"""The evaluation forward: per-token cross-entropy and every MoE layer's per-token routing.

`EvalForward(model)` walks `model.blocks` in `PanguSigmaModel.construct`'s order
(embedding, dense blocks, sparse blocks, query layer, final LayerNorm, tied head)
and, at each sparse block, asks the MoE layer's own router for the decision on the
LayerNorm output the layer receives, with the layer's token grouping and capacity
(as `MoELayer.construct` does), before running the layer itself. So the logits and
the routing are those of the network; the per-token view lets eval split the
routing counts by domain. `eval_batches` is the batch plan (numpy only).
"""
import numpy as np

from pangu_sigma.data.dataset import epoch_order


def eval_batches(num_samples, batch_size, seed, shuffle):
    """[(sample indices [B], counted [B] bool)] covering every sample exactly once.

    Samples in the order of the training split's first epoch for (seed, shuffle)
    (so on the train split, eval batch k is training batch k of a single process);
    every batch holds batch_size samples, as in training, so each token group has
    training's size and capacity: the short last batch is filled up with samples
    from the start of the order, which are routed but not counted.
    """
    order = epoch_order(num_samples, 0, seed, shuffle)
    plan = []
    for start in range(0, num_samples, batch_size):
        chosen = order[start:start + batch_size]
        counted = np.ones(batch_size, bool)
        if len(chosen) < batch_size:
            counted[len(chosen):] = False
            chosen = np.concatenate([chosen, np.resize(order, batch_size - len(chosen))])
        plan.append((chosen, counted))
    return plan


def eval_forward_cell(model, vocab_ce=None):
    """A Cell: (ids [B, S+1] int32, domain_ids [B] int32) -> (nll [B, S] float32, per sparse block
    (expert_index [G, T] int32, keep [G, T])); each layer's capacity follows from B * S as in training
    (MoELayer.route). vocab_ce: a tensor-parallel rank's VocabParallelCrossEntropy (its logits hold
    the rank's vocabulary slice), whose collectives give the per-token CE."""
    import mindspore as ms
    from mindspore import nn, ops

    from pangu_sigma.parallel.tp_layers import vocab_parallel_token_nll

    class EvalForward(nn.Cell):
        def __init__(self, model):
            super().__init__(auto_prefix=False)
            self.model = model
            self.sharded = vocab_ce is not None
            self.vocab_ce = vocab_ce

        def construct(self, ids, domain_ids):
            model = self.model
            inputs = ids[:, :-1]  # [B, S]
            labels = ids[:, 1:]  # [B, S]
            x, routes = model.forward_routes(inputs, domain_ids)
            routing = ()
            for _, expert_index, keep in routes:
                routing = routing + ((expert_index, keep),)  # ([G, T], [G, T])
            logits = model.embedding.logits(model.final_ln(model.query_layer(x)))  # [B, S, V (/tp)] float32
            batch, seq, vocab = logits.shape
            if self.sharded:
                ce = self.vocab_ce
                nll = vocab_parallel_token_nll(logits, labels, ce.vocab_start, ce.all_reduce, ce.all_gather)
                return nll.reshape(batch, seq), routing  # [B, S]
            flat = ops.cast(logits, ms.float32).reshape(-1, vocab)  # [B*S, V]
            shifted = flat - flat.max(axis=-1, keepdims=True)  # [B*S, V]
            log_probs = shifted - ops.log(ops.exp(shifted).sum(axis=-1, keepdims=True))  # [B*S, V]
            nll = -ops.gather_elements(log_probs, 1, labels.reshape(-1, 1)).reshape(batch, seq)  # [B, S]
            return nll, routing

    return EvalForward(model)
