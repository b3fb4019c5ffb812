"""Read order of a domain-affine placement (locmoe.placement): pure functions of
(domain ids, placement, seed, epoch), so a run started at batch k reads exactly
batches k, k+1, ... of an uninterrupted run.

Epoch e: each domain d's samples are permuted from (seed, e, d) (file order when
shuffle is off); global batch k takes the next q_d(k) samples of domain d
(DomainPlacement.batch_quotas: each batch's share with the rounding remainder
carried) and puts them, in order, into the slots of domain d of that batch's
layout [dp, B] (row = dp rank, the line of locmoe.placement). An epoch ends before
the first batch some domain cannot fill; the rest of each domain waits for the next
epoch's permutation.
"""
import numpy as np

from locmoe.errors import ConfigError


def epoch_batches(domain_ids, placement, seed, epoch, shuffle=True):
    """Sample indices of every global batch of one epoch. # [K, dp, B]"""
    domain_ids = np.asarray(domain_ids)
    dp, batch = placement.slot_domain.shape
    per_domain = [np.nonzero(domain_ids == d)[0] for d in range(len(placement.quotas))]
    held = np.array([len(samples) for samples in per_domain])  # [D]
    quotas = placement.batch_quotas(len(domain_ids) // (dp * batch) + 1)  # [K', D]
    taken = np.cumsum(quotas, 0)  # [K', D] samples of each domain used by the end of batch k
    batches = int((taken <= held[None]).all(1).sum())  # taken grows with k: the batches that fit
    if batches == 0:
        d = int(np.argmax(quotas[0] > held))
        raise ConfigError("train.batch_size", batch,
                          f"a global batch whose share of domain {d} ({int(quotas[0, d])} samples) fits the "
                          f"{int(held[d])} samples the split holds (data.placement=domain_affine)")
    layouts = placement.batch_layouts(quotas[:batches]).reshape(batches, dp * batch)  # [K, dp*B]
    order = np.zeros((batches, dp * batch), np.int64)  # [K, dp*B]
    for d, samples in enumerate(per_domain):
        if shuffle:
            samples = samples[np.random.default_rng([seed, epoch, d]).permutation(len(samples))]
        order[layouts == d] = samples[:taken[batches - 1, d]]  # row-major: batch k's slots after batch k-1's
    return order.reshape(batches, dp, batch)  # [K, dp, B]


def read_order(domain_ids, placement, dp_ranks, seed, epoch, shuffle=True):
    """The global sample indices the reader of `dp_ranks` takes in epoch `epoch`, in read order. # [K*len*B]

    One rank: dp_ranks=[r]. The single-process image of the cluster
    (virtual_scope: cluster): all ranks in dp order, so each batch is the ranks'
    batches side by side, as the token groups expect.
    """
    batches = epoch_batches(domain_ids, placement, seed, epoch, shuffle)  # [K, dp, B]
    return batches[:, list(dp_ranks)].reshape(-1)
