"""Batches of prepared samples for training and evaluation, with exact resume.

Choice: the split's MindRecord file is read once into memory with MindDataset
(shuffle off) and batches come from a GeneratorDataset whose order this module
computes itself, because MindDataset's own shuffle cannot promise that a pipeline
started at batch k yields exactly batches k, k+1, ... of an uninterrupted run
(its per-epoch reshuffle depends on pipeline state, not only on seed and epoch).

Order of epoch e: a numpy permutation of all samples from (seed, e) (identity when
shuffle=False), cut to a multiple of dp_size; global batch k is the k-th run of
batch_size * dp_size samples and data-parallel rank r takes its r-th block of
batch_size, so ranks hold disjoint, equal-sized shards and their batches side by
side are the single-process batch (drop_remainder drops the short last batch). Batch number b of the stream is batch
b - e * batches_per_epoch of epoch e, so start_batch=k resumes exactly at batch k,
across epoch boundaries too.
"""
import json
import os

import numpy as np

from locmoe.errors import ConfigError

SPLITS = ("train", "valid")
READ_BATCH = 4096  # rows per read while loading a split into memory
ENDLESS_LENGTH = 2**31 - 1  # dataset size reported when repeat=True (the stream never ends)


def read_meta(data_dir):
    """meta.json of a folder made by pangu_sigma.data.prepare, as a dict."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise ConfigError("data_dir", data_dir,
                          "a folder made by `python -m pangu_sigma.data.prepare` (it has no meta.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("data_dir", data_dir, f"a prepared dataset with a readable meta.json ({error})") from None
    missing = [key for key in ("vocab_size", "seq_length", "domains", "train_samples", "valid_samples")
               if key not in meta]
    if missing:
        raise ConfigError("data_dir", data_dir, f"a prepared dataset (meta.json lacks {missing})")
    return meta


def split_path(data_dir, split):
    if split not in SPLITS:
        raise ConfigError("split", split, f"one of {list(SPLITS)}")
    path = os.path.join(data_dir, f"{split}.mindrecord")
    if not os.path.isfile(path):
        raise ConfigError("data_dir", data_dir, f"a prepared dataset with {split}.mindrecord")
    return path


def batches_per_epoch(num_samples, batch_size, dp_size, drop_remainder=True):
    """Batches one data-parallel rank sees per epoch."""
    per_rank = num_samples // dp_size
    return per_rank // batch_size if drop_remainder else -(-per_rank // batch_size)


def check_integers(**values_and_minimums):
    for name, (value, low) in values_and_minimums.items():
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low):
            raise ConfigError(name, value, f"an integer >= {low}")


def num_batches(data_dir, split, batch_size, dp_size=1, drop_remainder=True):
    """Batches per epoch on each data-parallel rank."""
    check_integers(batch_size=(batch_size, 1), dp_size=(dp_size, 1))
    meta = read_meta(data_dir)
    split_path(data_dir, split)
    return batches_per_epoch(meta[f"{split}_samples"], batch_size, dp_size, drop_remainder)


def load_split(data_dir, split):
    """(input_ids [N, S+1] int32, domain_ids [N] int32) in file order."""
    import mindspore.dataset as ds

    path = split_path(data_dir, split)
    meta = read_meta(data_dir)
    count = meta[f"{split}_samples"]
    sample_length = meta["seq_length"] + 1
    input_ids = np.zeros([0, sample_length], np.int32)  # [N, S+1]
    domain_ids = np.zeros([0], np.int32)  # [N]
    if count:
        reader = ds.MindDataset(path, columns_list=["input_ids", "domain_id"], shuffle=False,
                                num_parallel_workers=1).batch(READ_BATCH, drop_remainder=False)
        chunks = list(reader.create_tuple_iterator(output_numpy=True, num_epochs=1))  # [(ids [b, S+1], domains [b])]
        input_ids = np.concatenate([ids for ids, _ in chunks]).astype(np.int32)
        domain_ids = np.concatenate([domains for _, domains in chunks]).astype(np.int32)
    if input_ids.shape != (count, sample_length):
        raise ConfigError("data_dir", data_dir, f"a {split}.mindrecord of {count} samples x {sample_length} tokens "
                          f"as meta.json says; it holds {input_ids.shape}")
    return input_ids, domain_ids


def epoch_order(num_samples, epoch, seed, shuffle):
    """Sample indices of one epoch, a function of (seed, epoch) only. # [N]"""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class BatchStream:
    """Iterable of (input_ids [B, S+1], domain_ids [B]) batches for one data-parallel rank."""

    def __init__(self, input_ids, domain_ids, batch_size, dp_size, dp_rank, shuffle, seed, start_batch,
                 repeat, drop_remainder, sample_order=None):
        self.input_ids = input_ids
        self.domain_ids = domain_ids
        self.batch_size = batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.shuffle = shuffle
        self.seed = seed
        self.start_batch = start_batch
        self.repeat = repeat
        # sample_order(domain_ids, epoch) -> this reader's sample indices in read order
        # (e.g. a domain-affine placement, pangu_sigma.data.placement_order); None: i.i.d. blocks.
        self.sample_order = sample_order
        if sample_order is None:
            self.per_epoch = batches_per_epoch(len(input_ids), batch_size, dp_size, drop_remainder)
        else:
            self.per_epoch = len(sample_order(domain_ids, 0)) // batch_size

    def __len__(self):
        return ENDLESS_LENGTH if self.repeat else self.per_epoch - self.start_batch

    def rank_samples(self, epoch):
        """This rank's sample indices in epoch order. # [N // dp]

        Global batch k is order[k*B*dp : (k+1)*B*dp] and rank r takes its r-th block
        of B rows, so the ranks' batches concatenated in rank order are exactly the
        batch a single process with batch size B*dp reads. A tail shorter than one
        global batch is dealt round-robin.
        """
        if self.sample_order is not None:
            return self.sample_order(self.domain_ids, epoch)
        order = epoch_order(len(self.input_ids), epoch, self.seed, self.shuffle)
        order = order[:len(order) - len(order) % self.dp_size]
        per_global = self.batch_size * self.dp_size
        full = len(order) // per_global * per_global
        blocks = order[:full].reshape(-1, self.dp_size, self.batch_size)[:, self.dp_rank].reshape(-1)  # [n*B]
        return np.concatenate([blocks, order[full:][self.dp_rank::self.dp_size]])

    def __iter__(self):
        epoch, batch = divmod(self.start_batch, self.per_epoch)
        while self.repeat or epoch == 0:
            samples = self.rank_samples(epoch)
            for index in range(batch, self.per_epoch):
                chosen = samples[index * self.batch_size:(index + 1) * self.batch_size]  # [B]
                yield self.input_ids[chosen], self.domain_ids[chosen]
            epoch, batch = epoch + 1, 0


def create_dataset(data_dir, split, batch_size, dp_size=1, dp_rank=0, shuffle=True, seed=1234, start_batch=0,
                   repeat=True, drop_remainder=True, sample_order=None):
    """A MindSpore dataset of batches: input_ids int32 [B, S+1], domain_id int32 [B].

    repeat=True: an endless stream over epochs 0, 1, 2, ... (get_dataset_size() reports
    2**31 - 1; use num_batches() for the epoch length). repeat=False: the rest of epoch 0
    after start_batch. Batch k of the stream is the same for any start_batch <= k.
    sample_order: see BatchStream (a domain-affine placement's read order).
    """
    import mindspore.dataset as ds

    check_integers(batch_size=(batch_size, 1), dp_size=(dp_size, 1), start_batch=(start_batch, 0), seed=(seed, 0))
    if not (isinstance(dp_rank, (int, np.integer)) and 0 <= dp_rank < dp_size):
        raise ConfigError("dp_rank", dp_rank, f"an integer in [0, {dp_size}) (dp_size={dp_size})")
    input_ids, domain_ids = load_split(data_dir, split)
    stream = BatchStream(input_ids, domain_ids, batch_size, dp_size, dp_rank, shuffle, seed, start_batch,
                         repeat, drop_remainder, sample_order)
    if len(input_ids) < dp_size:
        raise ConfigError("split", split, f"a split with >= dp_size={dp_size} samples; {data_dir} has "
                          f"{len(input_ids)} (prepare more text or a larger --valid-fraction)")
    if stream.per_epoch == 0:
        raise ConfigError("batch_size", batch_size,
                          f"at most {len(input_ids) // dp_size} (split {split!r} has {len(input_ids)} samples "
                          f"over {dp_size} data-parallel rank(s))")
    if not repeat and start_batch >= stream.per_epoch:
        raise ConfigError("start_batch", start_batch,
                          f"below {stream.per_epoch}, the batches of one epoch (repeat=False)")
    return ds.GeneratorDataset(stream, column_names=["input_ids", "domain_id"],
                               shuffle=False, num_parallel_workers=1, python_multiprocessing=False)
