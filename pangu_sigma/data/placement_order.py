"""Read order of a domain-affine placement (locmoe.placement): pure functions of
(domain ids, slot layout, seed, epoch), so a run started at batch k reads exactly
batches k, k+1, ... of an uninterrupted run.

Epoch e: each domain d's samples are permuted from (seed, e, d) (file order when
shuffle is off); global batch k takes the next q_d samples of domain d and puts
them, in order, into the slots of domain d of slot_domain [dp, B] (row = dp rank,
the line of locmoe.placement). An epoch has K = min_d floor(n_d / q_d) global
batches; the rest of each domain waits for the next epoch's permutation.
"""
import numpy as np

from locmoe.errors import ConfigError


def epoch_batches(domain_ids, slot_domain, seed, epoch, shuffle=True):
    """Sample indices of every global batch of one epoch. # [K, dp, B]"""
    domain_ids = np.asarray(domain_ids)
    slot_domain = np.asarray(slot_domain)
    dp, batch = slot_domain.shape
    flat_slots = slot_domain.reshape(-1)  # [dp*B]
    used = np.unique(flat_slots)
    per_domain = {int(d): np.nonzero(domain_ids == d)[0] for d in used}
    quotas = {d: int((flat_slots == d).sum()) for d in per_domain}
    short = [d for d in per_domain if len(per_domain[d]) < quotas[d]]
    if short:
        d = short[0]
        raise ConfigError("train.batch_size", batch,
                          f"a global batch whose share of domain {d} ({quotas[d]} samples) fits the "
                          f"{len(per_domain[d])} samples the split holds (data.placement=domain_affine)")
    batches = min(len(per_domain[d]) // quotas[d] for d in per_domain)
    order = np.zeros((batches, dp * batch), np.int64)  # [K, dp*B]
    for d, samples in per_domain.items():
        if shuffle:
            samples = samples[np.random.default_rng([seed, epoch, d]).permutation(len(samples))]
        order[:, flat_slots == d] = samples[:batches * quotas[d]].reshape(batches, quotas[d])  # [K, q_d]
    return order.reshape(batches, dp, batch)  # [K, dp, B]


def read_order(domain_ids, slot_domain, dp_ranks, seed, epoch, shuffle=True):
    """The global sample indices the reader of `dp_ranks` takes in epoch `epoch`, in read order. # [K*len*B]

    One rank: dp_ranks=[r]. The single-process image of the cluster
    (virtual_scope: cluster): all ranks in dp order, so each batch is the ranks'
    batches side by side, as the token groups expect.
    """
    batches = epoch_batches(domain_ids, slot_domain, seed, epoch, shuffle)  # [K, dp, B]
    return batches[:, list(dp_ranks)].reshape(-1)
