"""Batches of prepared samples for training and evaluation: sharded reading, exact resume.

Choice: every process reads only its own rows, straight from the split's MindRecord
shards (MindDataset over the shard list with a SubsetSampler of this rank's global row
indices, a bounded chunk at a time), and the order is computed here, because
MindDataset's own shuffle cannot promise that a pipeline started at batch k yields
exactly batches k, k+1, ... of an uninterrupted run (its per-epoch reshuffle depends on
pipeline state, not only on seed and epoch).

Order of epoch e (rank_epoch_order, the one function placement code swaps): a numpy
permutation of all samples from (seed, e) (identity when shuffle=False), cut to a
multiple of dp_size; global batch k is the k-th run of batch_size * dp_size samples and
data-parallel rank r takes its r-th block of batch_size, so ranks hold disjoint,
equal-sized shards and their batches side by side are the single-process batch
(drop_remainder drops the short last batch). Batch number b of the stream is batch
b - e * batches_per_epoch of epoch e, so start_batch=k resumes exactly at batch k,
across epoch and shard boundaries too. Global row i of a split is row i of the shards
concatenated in meta.json's order, so the batches do not depend on how the split was
sharded.

read_meta checks the prepared folder before anything runs: every shard and .db index
present, of the size meta.json records, the sample counts adding up, and the tokenizer and
token counts matching vocab_size; each problem is one ConfigError line. The shards' sha256
(recorded once, by prepare) is checked only with checksums=True: single-process commands,
one rank of a distributed run (data.verify_checksums) or `python -m pangu_sigma.data.verify`,
so a launch does not read the corpus once per process before init().
"""
import json
import os

import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.data.shards import FORMAT_VERSION, meta_digest, verify_split, verify_vocabulary

SPLITS = ("train", "valid")
READ_ROWS = 16384  # rows per MindDataset reader (a bounded chunk of this rank's read order)
ENDLESS_LENGTH = 2**31 - 1  # dataset size reported when repeat=True (the stream never ends)


def read_meta(data_dir, checksums=False):
    """meta.json of a folder made by pangu_sigma.data.prepare, as a dict, after checking the files against it
    (sizes and counts; with checksums also every shard's sha256, which reads the whole split)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise ConfigError("data_dir", data_dir,
                          "a folder made by `python -m pangu_sigma.data.prepare` (it has no meta.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("data_dir", data_dir, f"a prepared dataset with a readable meta.json ({error})") from None
    if not isinstance(meta, dict):
        raise ConfigError("data_dir", data_dir, "a prepared dataset (its meta.json is not a JSON object)")
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError("data_dir", data_dir, f"a dataset in format {FORMAT_VERSION} (sharded MindRecord); "
                          f"it has format {meta.get('format', 1)}: prepare it again with python -m "
                          f"pangu_sigma.data.prepare")
    missing = [key for key in ("vocab_size", "seq_length", "domains", "train_samples", "valid_samples", "splits",
                               "tokenizer", "tokenizer_sha256", "token_counts") if key not in meta]
    if missing:
        raise ConfigError("data_dir", data_dir, f"a prepared dataset (meta.json lacks {missing})")
    try:
        verify_vocabulary(data_dir, meta)
        for split in SPLITS:
            verify_split(data_dir, meta, split, checksums)
            check_row_length(data_dir, meta, split)
    except (KeyError, TypeError) as error:
        raise ConfigError("data_dir", data_dir, f"a prepared dataset (meta.json malformed: {error!r})") from None
    # last: any edit the checks above did not name (absent in datasets prepared before the digest existed)
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        raise ConfigError("data", path, "the meta.json prepare wrote; its content no longer matches its "
                          "meta_sha256 (edited after prepare): prepare the data again (python -m "
                          "pangu_sigma.data.prepare)")
    return meta


def stored_row_length(path):
    """Tokens per row a MindRecord shard declares (the shape of its input_ids column), or None if unreadable.

    The file opens with its header: the header's byte count (uint64, little-endian), then the header
    as JSON, whose "schema" list holds the column shapes (as mindspore.mindrecord.FileWriter writes it).
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(size, 1 << 24)))
        return next(entry["schema"]["input_ids"]["shape"][0] for entry in header["schema"]
                    if "input_ids" in entry["schema"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration):
        return None


def check_row_length(data_dir, meta, split):
    """Every shard's rows hold seq_length + 1 tokens, as meta.json says."""
    sample_length = meta["seq_length"] + 1
    if meta.get("sample_length", sample_length) != sample_length:
        raise ConfigError("data", os.path.join(data_dir, "meta.json"), f"sample_length={meta['sample_length']} "
                          f"equal to seq_length + 1 = {sample_length}; meta.json is inconsistent")
    for shard in meta["splits"][split]["shards"]:
        stored = stored_row_length(os.path.join(data_dir, shard["file"]))
        if stored != sample_length:
            raise ConfigError("data", os.path.join(data_dir, shard["file"]),
                              f"rows of seq_length + 1 = {sample_length} tokens as meta.json says; the shard's "
                              f"rows hold {stored} (meta.json does not match the files): prepare the data again")


def check_split(split):
    if split not in SPLITS:
        raise ConfigError("split", split, f"one of {list(SPLITS)}")


def shard_paths(data_dir, split, meta=None):
    """The split's MindRecord files in row order."""
    check_split(split)
    meta = read_meta(data_dir) if meta is None else meta
    return [os.path.join(data_dir, shard["file"]) for shard in meta["splits"][split]["shards"]]


def read_domain_ids(data_dir, split):
    """Every sample's domain id in split row order, without reading the token rows. # [N] int32"""
    check_split(split)
    meta = read_meta(data_dir)
    return np.load(os.path.join(data_dir, meta["splits"][split]["domain_ids"])).astype(np.int32)


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
    check_split(split)
    meta = read_meta(data_dir)
    return batches_per_epoch(meta[f"{split}_samples"], batch_size, dp_size, drop_remainder)


def read_rows(paths, indices, batch_size):
    """(input_ids [b, S+1] int32, domain_ids [b] int32) batches of the given global rows, in that order.

    Reads READ_ROWS rows per MindDataset so memory stays bounded whatever the split size.
    """
    import mindspore.dataset as ds

    chunk = max(1, READ_ROWS // batch_size) * batch_size
    for first in range(0, len(indices), chunk):
        wanted = indices[first:first + chunk]
        try:
            reader = ds.MindDataset(paths, columns_list=["input_ids", "domain_id"], num_parallel_workers=1,
                                    sampler=ds.SubsetSampler([int(i) for i in wanted]))
            reader = reader.batch(batch_size, drop_remainder=False)
            for ids, domains in reader.create_tuple_iterator(output_numpy=True, num_epochs=1):
                yield ids.astype(np.int32, copy=False), domains.astype(np.int32, copy=False)
        except RuntimeError as error:
            message = " ".join(str(error).split())[:300]
            raise ConfigError("data", paths[0] if len(paths) == 1 else os.path.dirname(paths[0]),
                              f"MindRecord shards MindSpore can read ({message})") from None


def load_split(data_dir, split):
    """(input_ids [N, S+1] int32, domain_ids [N] int32) of a whole split in row order (analysis tools)."""
    meta = read_meta(data_dir)
    check_split(split)
    count = meta[f"{split}_samples"]
    sample_length = meta["seq_length"] + 1
    chunks = list(read_rows(shard_paths(data_dir, split, meta), np.arange(count), READ_ROWS))
    input_ids = np.concatenate([ids for ids, _ in chunks]) if chunks else np.zeros([0, sample_length], np.int32)
    domain_ids = np.concatenate([d for _, d in chunks]) if chunks else np.zeros([0], np.int32)
    if input_ids.shape != (count, sample_length):
        raise ConfigError("data_dir", data_dir, f"{split} shards of {count} samples x {sample_length} tokens "
                          f"as meta.json says; they hold {input_ids.shape}")
    return input_ids, domain_ids


def epoch_order(num_samples, epoch, seed, shuffle):
    """Sample indices of one epoch, a function of (seed, epoch) only (identity without shuffle). # [N]"""
    return np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)


def rank_epoch_order(num_samples, epoch, seed, shuffle, batch_size, dp_size, dp_rank):
    """Global sample indices this data-parallel rank reads in epoch `epoch`, in read order. # [N // dp]

    The epoch's order is a permutation from (seed, epoch) only (identity without shuffle),
    cut to a multiple of dp_size. Global batch k is order[k*B*dp : (k+1)*B*dp] and rank r
    takes its r-th block of B rows, so the ranks' batches concatenated in rank order are
    exactly the batch a single process with batch size B*dp reads. A tail shorter than
    one global batch is dealt round-robin. Placement code (e.g. domain-affine data) may
    replace this function; BatchStream only needs its contract: a function of these
    arguments alone, disjoint across ranks, the same length on every rank.
    """
    order = epoch_order(num_samples, epoch, seed, shuffle)
    order = order[:len(order) - len(order) % dp_size]
    per_global = batch_size * dp_size
    full = len(order) // per_global * per_global
    blocks = order[:full].reshape(-1, dp_size, batch_size)[:, dp_rank].reshape(-1)  # [n*B]
    return np.concatenate([blocks, order[full:][dp_rank::dp_size]])


class BatchStream:
    """Iterable of (input_ids [B, S+1], domain_ids [B]) batches for one data-parallel rank, read from the shards."""

    def __init__(self, read_batches, num_samples, batch_size, dp_size, dp_rank, shuffle, seed, start_batch, repeat,
                 drop_remainder, order_fn=None):
        self.read_batches = read_batches  # (global row indices [n], batch size) -> iterator of batches
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.shuffle = shuffle
        self.seed = seed
        self.start_batch = start_batch
        self.repeat = repeat
        # order_fn: (num_samples, epoch, seed, shuffle, batch_size, dp_size, dp_rank) -> this reader's
        # global sample indices in read order (default: i.i.d. blocks, rank_epoch_order; a domain-affine
        # placement passes its own, see create_dataset's sample_order)
        self.order_fn = order_fn or rank_epoch_order
        if order_fn is None:
            self.per_epoch = batches_per_epoch(num_samples, batch_size, dp_size, drop_remainder)
        else:
            self.per_epoch = len(self.rank_samples(0)) // batch_size

    def __len__(self):
        return ENDLESS_LENGTH if self.repeat else self.per_epoch - self.start_batch

    def rank_samples(self, epoch):
        """This rank's sample indices in epoch order. # [N // dp]"""
        return self.order_fn(self.num_samples, epoch, self.seed, self.shuffle, self.batch_size, self.dp_size,
                             self.dp_rank)

    def __iter__(self):
        epoch, batch = divmod(self.start_batch, self.per_epoch)
        while self.repeat or epoch == 0:
            samples = self.rank_samples(epoch)
            wanted = samples[batch * self.batch_size:self.per_epoch * self.batch_size]  # [n]
            yield from self.read_batches(wanted, self.batch_size)
            epoch, batch = epoch + 1, 0


def split_micro_batches(rows, micro_batches, groups=1):
    """One batch [G*B, ...] (G token groups of B rows, group-major) -> micro_batches arrays [G*m, ...], m = B / k:
    micro-batch j holds rows j*m..(j+1)*m of every group (each group's rows stay its own, in order)."""
    per_group = rows.shape[0] // groups
    micro = per_group // micro_batches
    blocks = rows.reshape((groups, micro_batches, micro) + rows.shape[1:])  # [G, k, m, ...]
    return [np.ascontiguousarray(blocks[:, j].reshape((groups * micro,) + rows.shape[1:]))
            for j in range(micro_batches)]


class MicroBatchStream:
    """A BatchStream's batches, each cut into `micro_batches` consecutive micro-batches (split_micro_batches)."""

    def __init__(self, stream, micro_batches, groups):
        self.stream, self.micro_batches, self.groups = stream, micro_batches, groups

    def __len__(self):
        return ENDLESS_LENGTH if self.stream.repeat else len(self.stream) * self.micro_batches

    def __iter__(self):
        for ids, domains in self.stream:
            yield from zip(split_micro_batches(ids, self.micro_batches, self.groups),
                           split_micro_batches(domains, self.micro_batches, self.groups))


def create_dataset(data_dir, split, batch_size, dp_size=1, dp_rank=0, shuffle=True, seed=1234, start_batch=0,
                   repeat=True, drop_remainder=True, sample_order=None, micro_batches=1, groups=1):
    """A MindSpore dataset of batches: input_ids int32 [B, S+1], domain_id int32 [B].

    repeat=True: an endless stream over epochs 0, 1, 2, ... (get_dataset_size() reports
    2**31 - 1; use num_batches() for the epoch length). repeat=False: the rest of epoch 0
    after start_batch. Batch k of the stream is the same for any start_batch <= k.
    Only this rank's rows are read. sample_order: None (i.i.d. blocks) or a function
    (domain_ids [N], epoch) -> this reader's sample indices in read order (a domain-affine
    placement, pangu_sigma.build.placement_sample_order); the domain ids come from
    read_domain_ids, without reading the token rows. micro_batches > 1 (gradient accumulation):
    every batch of `groups` token groups of batch_size / groups rows comes out as that many
    micro-batches (split_micro_batches); start_batch still counts whole batches.
    """
    import mindspore.dataset as ds

    check_integers(batch_size=(batch_size, 1), dp_size=(dp_size, 1), start_batch=(start_batch, 0), seed=(seed, 0))
    if not (isinstance(dp_rank, (int, np.integer)) and 0 <= dp_rank < dp_size):
        raise ConfigError("dp_rank", dp_rank, f"an integer in [0, {dp_size}) (dp_size={dp_size})")
    check_split(split)
    meta = read_meta(data_dir)
    count = meta[f"{split}_samples"]
    paths = shard_paths(data_dir, split, meta)
    order_fn = None
    if sample_order is not None:
        domain_ids = read_domain_ids(data_dir, split)  # [N]

        def order_fn(num_samples, epoch, *_):
            return sample_order(domain_ids, epoch)
    stream = BatchStream(lambda rows, size: read_rows(paths, rows, size), count, batch_size, dp_size, dp_rank,
                         shuffle, seed, start_batch, repeat, drop_remainder, order_fn)
    if count < dp_size:
        raise ConfigError("split", split, f"a split with >= dp_size={dp_size} samples; {data_dir} has "
                          f"{count} (prepare more text or a larger --valid-fraction)")
    if stream.per_epoch == 0:
        raise ConfigError("batch_size", batch_size,
                          f"at most {count // dp_size} (split {split!r} has {count} samples "
                          f"over {dp_size} data-parallel rank(s))")
    if not repeat and start_batch >= stream.per_epoch:
        raise ConfigError("start_batch", start_batch,
                          f"below {stream.per_epoch}, the batches of one epoch (repeat=False)")
    if micro_batches > 1:
        if batch_size % (groups * micro_batches):
            raise ConfigError("batch_size", batch_size, f"a multiple of {groups} token group(s) x {micro_batches} "
                              "micro-batches")
        stream = MicroBatchStream(stream, micro_batches, groups)
    return ds.GeneratorDataset(stream, column_names=["input_ids", "domain_id"],
                               shuffle=False, num_parallel_workers=1, python_multiprocessing=False)
