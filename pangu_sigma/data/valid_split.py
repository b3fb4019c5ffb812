"""The valid split: stratified by domain, a deterministic function of the seed and the sample counts."""
import numpy as np

DEFAULT_MIN_VALID_PER_DOMAIN = 8


def valid_count(num_samples, valid_fraction, min_per_domain):
    """Valid samples of a domain of num_samples: round(fraction * n), at least min_per_domain, and never
    more than half the domain (train keeps >= half); 0 when valid_fraction is 0."""
    if valid_fraction == 0 or num_samples < 2:
        return 0
    wanted = max(min_per_domain, int(round(num_samples * valid_fraction)), 1)
    return min(wanted, num_samples // 2)


def choose_valid_of_domain(domain, num_samples, valid_fraction, seed, min_per_domain=DEFAULT_MIN_VALID_PER_DOMAIN):
    """Sorted indices, within the domain, of its valid samples: known as soon as the domain's sample
    count is, so prepare can write the train rows of finished domains while later ones are encoded. # [v]"""
    take = valid_count(num_samples, valid_fraction, min_per_domain)
    if not take:
        return np.zeros([0], np.int64)
    return np.sort(np.random.default_rng([seed, domain]).choice(num_samples, size=take, replace=False)).astype(np.int64)


def choose_valid(domain_samples, valid_fraction, seed, min_per_domain=DEFAULT_MIN_VALID_PER_DOMAIN):
    """Sorted global indices of the valid samples. domain_samples: [N_d], samples of domain d are
    global rows offset_d .. offset_d + N_d - 1. # [V]"""
    chosen, offset = [], 0
    for domain, count in enumerate(domain_samples):
        chosen.append(offset + choose_valid_of_domain(domain, count, valid_fraction, seed, min_per_domain))
        offset += count
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros([0], np.int64)
