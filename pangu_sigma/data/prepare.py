"""Corpus folder -> tokenizer + sharded MindRecord samples with a domain id each, streamed.

    python -m pangu_sigma.data.prepare --input CORPUS --output DATA [--vocab-size N]
        [--seq-length S] [--valid-fraction F] [--min-valid-per-domain N] [--tokenizer MODEL]
        [--model-type bpe|unigram] [--max-chars N] [--tokenizer-sampling proportional|equal]
        [--character-coverage C] [--workers N] [--shard-mb MB] [--seed N] [--overwrite]

CORPUS has one subfolder per domain (domain ids follow the sorted names); a flat folder
of files is one domain named "default". Every file below a domain folder (recursively,
hidden ones excluded, sorted by path) is one document: files that are not UTF-8 are
skipped and reported; the others are tokenized, each followed by EOS, and the token
stream of each domain is cut into samples of seq_length + 1 tokens (the tail shorter
than one sample is dropped).

Stages (one file each): corpus.py scans the folder (sizes, characters, UTF-8 check);
tokenizer.py trains SentencePiece on a bounded sample spread over the corpus (or loads
--tokenizer); worker processes (workers.py) encode line-aligned pieces of about 1 MB,
which this module packs in document order into a spool of samples on disk; the valid
split (valid_split.py) is stratified by domain, so a domain's split is final when the
domain ends: its full train shards (shards.py) are then written by a writer process while
later domains are encoded (ShardStream); the last train shard and the valid shards follow
the encoding. Memory holds a bounded number of pieces in flight, not the corpus.
meta.json's timings: encode_pack runs to the end of encoding (shard writes overlap it),
write from there to the last shard named.

DATA receives tokenizer.model, train-0000i-of-0000K.mindrecord and valid-... shards
(each with its .db index; fields input_ids int32 [S+1], domain_id int32),
{train,valid}_domain_ids.npy (int32 [N], every row's domain), token_counts.npy (int64
[vocab], train split) and meta.json (shard list with sample counts, sizes and sha256,
the tokenizer's sha256). It is built in a temporary folder next to DATA and renamed into
place only when complete; Ctrl-C leaves DATA as it was.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import time

import numpy as np

from locmoe.errors import (ConfigError, Terminated, ctrl_c_deferred, end_quiet_start, settle_for_exit,
                           sigterm_raises)
from pangu_sigma.data import corpus as corpus_module
from pangu_sigma.data.output_folder import built_in_temp, check_paths
from pangu_sigma.data.shards import (DEFAULT_SHARD_BYTES, FORMAT_VERSION, WRITE_CHUNK, domain_ids_name, meta_digest,
                                     rows_per_shard, shard_name, shard_rows, temp_shard_name)
from pangu_sigma.data.tokenizer import (DEFAULT_CHARACTER_COVERAGE, SAMPLING, file_sha256, load_tokenizer,
                                        train_tokenizer)
from pangu_sigma.data.valid_split import DEFAULT_MIN_VALID_PER_DOMAIN, choose_valid_of_domain
from pangu_sigma.data.workers import (InputChanged, default_workers, encode_task, make_pool, make_writer,
                                      read_spool_rows, rename_task, spool_dtype, write_task)

DEFAULT_VOCAB_SIZE = 2000
DEFAULT_SEQ_LENGTH = 64
DEFAULT_VALID_FRACTION = 0.01
DEFAULT_MAX_CHARS = 10_000_000
DEFAULT_PROGRESS_SECONDS = 5.0
TOKENIZER_FILE = "tokenizer.model"
TOKEN_COUNTS_FILE = "token_counts.npy"
META_FILE = "meta.json"
SPOOL_FILE = "samples.spool"  # packed samples of all domains before the split; deleted at the end
SPLITS = ("train", "valid")


def log(message):
    """Progress goes to stderr so stdout stays for the final summary."""
    print(f"prepare: {message}", file=sys.stderr, flush=True)


class Progress:
    """A stderr line at most every `seconds`: done/total, rate and ETA of the current stage (MB, or samples)."""

    def __init__(self, seconds, stage, total, unit="MB"):
        self.seconds, self.stage, self.total, self.unit = seconds, stage, max(total, 1), unit
        self.scale = 1e6 if unit == "MB" else 1
        self.started = self.last = time.time()
        self.done = 0

    def __call__(self, amount):
        self.done += amount
        now = time.time()
        if self.seconds and now - self.last >= self.seconds:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            log(f"{self.stage} {self.done / self.scale:,.1f}/{self.total / self.scale:,.1f} {self.unit} "
                f"({100 * self.done / self.total:.0f}%), {rate / self.scale:,.2f} {self.unit}/s, "
                f"ETA {format_seconds(eta)}")


def format_seconds(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -------- arguments
def check_arguments(vocab_size, seq_length, valid_fraction, max_chars, seed, model_type, workers=1,
                    shard_bytes=DEFAULT_SHARD_BYTES, sampling="proportional",
                    character_coverage=DEFAULT_CHARACTER_COVERAGE, min_valid_per_domain=0):
    def is_int(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if vocab_size is not None and not (is_int(vocab_size) and vocab_size >= 1):
        raise ConfigError("vocab_size", vocab_size, "an integer >= 1")
    if not (is_int(seq_length) and seq_length >= 2):
        raise ConfigError("seq_length", seq_length, "an integer >= 2")
    if not (isinstance(valid_fraction, (int, float)) and 0.0 <= valid_fraction < 1.0):
        raise ConfigError("valid_fraction", valid_fraction, "a number in [0, 1)")
    if not (is_int(max_chars) and max_chars >= 1):
        raise ConfigError("max_chars", max_chars, "an integer >= 1")
    if not (is_int(seed) and seed >= 0):
        raise ConfigError("seed", seed, "an integer >= 0")
    if model_type not in ("bpe", "unigram"):
        raise ConfigError("model_type", model_type, "'bpe' or 'unigram'")
    if not (is_int(workers) and workers >= 1):
        raise ConfigError("workers", workers, "an integer >= 1")
    if not (is_int(shard_bytes) and shard_bytes >= 1):
        raise ConfigError("shard_bytes", shard_bytes, "an integer >= 1")
    if sampling not in SAMPLING:
        raise ConfigError("tokenizer_sampling", sampling, f"one of {list(SAMPLING)}")
    if not (isinstance(character_coverage, (int, float)) and 0.98 <= character_coverage <= 1.0):
        raise ConfigError("character_coverage", character_coverage, "a number in [0.98, 1] (SentencePiece's range)")
    if not (is_int(min_valid_per_domain) and min_valid_per_domain >= 0):
        raise ConfigError("min_valid_per_domain", min_valid_per_domain, "an integer >= 0")


# -------- stages
class ShardStream:
    """Packed rows -> sharded splits, written while later text is still being encoded.

    A domain's valid rows are known once its sample count is (valid_split.choose_valid_of_domain), so
    when a domain ends its train rows are final; every full train shard (rows_per_shard rows, in split
    order) then goes to the writer process at once, under temp_shard_name since the shard count is not
    known yet. finish() writes the last train shard and the valid shards under their final names and
    renames the others (rename_shard patches the name MindRecord keeps inside the files): the files and
    meta.json equal those written after encoding.
    """

    def __init__(self, writer, renamer, temp_dir, spool_path, spool_dtype, sample_length, shard_bytes,
                 valid_fraction, seed, min_valid_per_domain):
        self.writer, self.renamer = writer, renamer
        self.temp_dir, self.spool_path, self.sample_length = temp_dir, spool_path, sample_length
        self.spool_dtype = spool_dtype
        self.shard_bytes = shard_bytes
        self.per_shard = rows_per_shard(sample_length, shard_bytes)
        self.valid_fraction, self.seed, self.min_valid = valid_fraction, seed, min_valid_per_domain
        self.domain_samples = []          # [D] samples of every finished domain
        self.train_counts = []            # [D] its train samples
        self.valid_rows = []              # per finished domain: its valid rows (global spool rows) [v_d]
        self.pending_rows = np.zeros([0], np.int64)   # train rows not yet in a shard [p]
        self.pending_domains = np.zeros([0], np.int32)  # their domains [p]
        self.started = []                 # (temp path, write task, result) of the full train shards

    def finish_domain(self, samples):
        """The next domain ended with `samples` packed rows: its split is decided, full shards start."""
        domain, offset = len(self.domain_samples), sum(self.domain_samples)
        valid = choose_valid_of_domain(domain, samples, self.valid_fraction, self.seed, self.min_valid)  # [v]
        is_valid = np.zeros([samples], bool)
        is_valid[valid] = True
        train = offset + np.flatnonzero(~is_valid)  # [t]
        self.domain_samples.append(samples)
        self.train_counts.append(len(train))
        self.valid_rows.append(offset + valid)
        self.pending_rows = np.concatenate([self.pending_rows, train])
        self.pending_domains = np.concatenate([self.pending_domains, np.full([len(train)], domain, np.int32)])
        while len(self.pending_rows) >= self.per_shard:
            path = os.path.join(self.temp_dir, temp_shard_name("train", len(self.started)))
            task = (path, self.spool_path, self.pending_rows[:self.per_shard],
                    self.pending_domains[:self.per_shard], self.sample_length, False, self.spool_dtype)
            self.started.append((path, task, self.writer.submit(write_task, task)))
            self.pending_rows = self.pending_rows[self.per_shard:]
            self.pending_domains = self.pending_domains[self.per_shard:]

    def finish(self, progress):
        """Writes what is left, names every shard; returns ({split: meta entry}, {split: domain ids [N]})."""
        valid_rows = np.concatenate(self.valid_rows) if self.valid_rows else np.zeros([0], np.int64)  # [V]
        valid_domains = np.repeat(np.arange(len(self.domain_samples), dtype=np.int32),
                                  [len(rows) for rows in self.valid_rows])  # [V]
        train_count = len(self.started) + (1 if len(self.pending_rows) else 0)
        valid_ranges = shard_rows(len(valid_rows), self.sample_length, self.shard_bytes)
        final_tasks = []  # (split, index, write task): written under their final names now
        if len(self.pending_rows):
            final_tasks.append(("train", train_count - 1, (
                os.path.join(self.temp_dir, shard_name("train", train_count - 1, train_count)), self.spool_path,
                self.pending_rows, self.pending_domains, self.sample_length, True, self.spool_dtype)))
        for index, (first, end) in enumerate(valid_ranges):
            final_tasks.append(("valid", index, (
                os.path.join(self.temp_dir, shard_name("valid", index, len(valid_ranges))), self.spool_path,
                valid_rows[first:end], valid_domains[first:end], self.sample_length, True, self.spool_dtype)))
        finals = [(split, index, self.writer.submit(write_task, task)) for split, index, task in final_tasks]
        renames = []
        for index, (temp_path, task, result) in enumerate(self.started):
            result.get()
            final_path = os.path.join(self.temp_dir, shard_name("train", index, train_count))
            renames.append((index, temp_path, final_path, task,
                            self.renamer.submit(rename_task, (temp_path, final_path, len(task[2])))))
        entries = {"train": [None] * train_count, "valid": [None] * len(valid_ranges)}
        for index, temp_path, final_path, task, result in renames:
            entry = result.get()
            if entry is None:  # a count of more than 5 digits: write it again under its final name
                for suffix in ("", ".db"):
                    os.remove(temp_path + suffix)
                entry = self.writer.submit(write_task, (final_path,) + task[1:5] + (True, self.spool_dtype)).get()
            entries["train"][index] = entry
            progress(entry["samples"])
        for split, index, result in finals:
            entries[split][index] = result.get()
            progress(entries[split][index]["samples"])
        train_domains = np.repeat(np.arange(len(self.domain_samples), dtype=np.int32), self.train_counts)  # [N_t]
        splits = {split: {"shards": entries[split], "domain_ids": domain_ids_name(split)} for split in SPLITS}
        return splits, {"train": train_domains, "valid": valid_domains}, valid_rows


def encode_pack_write(pool, corpus, spool_path, sample_length, vocab_size, window, progress, stream):
    """Encodes every domain in document order, appends its samples to the spool file (ids of
    stream.spool_dtype) and hands every finished domain to stream (which writes its full train shards
    in the background).

    Returns (samples per domain [D], tokens per domain [D], token counts of all samples [V]).
    """
    def tasks():
        for index, domain in enumerate(corpus.domains):
            for task in corpus_module.encode_tasks(index, domain):
                yield task + (stream.spool_dtype,)

    samples = [0] * len(corpus.domains)
    tokens = [0] * len(corpus.domains)
    counts = np.zeros([vocab_size], np.int64)  # [V]
    carry = [np.zeros([0], stream.spool_dtype) for _ in corpus.domains]
    with open(spool_path, "wb") as spool:
        for domain, ids, size in pool.imap(encode_task, tasks(), window):
            while len(stream.domain_samples) < domain:  # the domains before this one have ended
                spool.flush()
                stream.finish_domain(samples[len(stream.domain_samples)])
            tokens[domain] += len(ids)
            stream_ids = np.concatenate([carry[domain], ids])  # [T]
            count = len(stream_ids) // sample_length
            rows = stream_ids[:count * sample_length].reshape(count, sample_length)  # [n, S+1]
            carry[domain] = stream_ids[count * sample_length:]
            spool.write(rows)  # [n, S+1], C-contiguous: its bytes, without a copy
            counts += np.bincount(rows.reshape(-1), minlength=vocab_size)
            samples[domain] += count
            progress(size)
        for domain, count in zip(corpus.domains, tokens):
            if count < sample_length:
                raise ConfigError("input", corpus.root,
                                  f"enough text for one sample of seq_length+1={sample_length} tokens in every "
                                  f"domain; domain {domain.name!r} has {count} tokens")
        spool.flush()
        while len(stream.domain_samples) < len(corpus.domains):
            stream.finish_domain(samples[len(stream.domain_samples)])
    return samples, tokens, counts


def build(temp_dir, input_dir, vocab_size, seq_length, valid_fraction, tokenizer, model_type, max_chars, seed,
          progress_seconds, workers, shard_bytes, sampling, character_coverage, min_valid_per_domain):
    """Does all the work inside temp_dir and returns meta."""
    started = time.time()
    timings = {}
    given_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer, vocab_size)
    # Shards are written by one process of their own (the caller's with --workers 1), which alone imports
    # MindSpore's MindRecord writer (~0.2 GB per process); the encode workers rename and checksum them.
    # With 2+ workers the writer must not be this process: a shard written here stops the feeding of
    # the encode workers for as long as it takes. It starts now and imports MindRecord (~1 CPU-s) while
    # this process scans the corpus and trains the tokenizer; the peak memory stays that of the shard
    # writes (the writer holds ~0.5 GB while it writes a 256 MB shard).
    writer = pool = None
    try:
        with ctrl_c_deferred():  # a Ctrl-C meanwhile comes once the process is there to terminate
            writer = make_writer(workers)
        sizes = sum(os.path.getsize(p) for _, folder in corpus_module.find_domains(input_dir)
                    for p in corpus_module.list_files(folder))
        corpus = corpus_module.scan_corpus(input_dir, Progress(progress_seconds, "scan", sizes))
        timings["scan"] = time.time() - started

        tic = time.time()
        model_path = os.path.join(temp_dir, TOKENIZER_FILE)
        sample_budget = None
        if given_tokenizer is None:
            vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
            if progress_seconds:
                log(f"training a {model_type} tokenizer, vocab {vocab_size}, on a {sampling} sample of "
                    f"<= {max_chars:,} characters")
            processor, sample_budget = train_tokenizer(corpus.domains, model_path, vocab_size, model_type,
                                                       max_chars, sampling, character_coverage)
        else:
            processor = given_tokenizer
            shutil.copyfile(tokenizer, model_path)
        vocab_size = processor.vocab_size()
        timings["tokenizer"] = time.time() - tic

        sample_length = seq_length + 1
        spool_path = os.path.join(temp_dir, SPOOL_FILE)
        window = 2 * workers + 2
        with ctrl_c_deferred():
            pool = make_pool(workers, model_path)
        tic = time.time()
        stream = ShardStream(writer, pool, temp_dir, spool_path, spool_dtype(vocab_size), sample_length,
                             shard_bytes, valid_fraction, seed, min_valid_per_domain)
        domain_samples, domain_tokens, counts = encode_pack_write(
            pool, corpus, spool_path, sample_length, vocab_size, window,
            Progress(progress_seconds, "encode", corpus.bytes), stream)
        timings["encode_pack"] = time.time() - tic
        tic = time.time()
        splits, split_domains, valid_rows = stream.finish(
            Progress(progress_seconds, "write", sum(domain_samples), "samples"))
        for split in SPLITS:
            np.save(os.path.join(temp_dir, domain_ids_name(split)), split_domains[split])
        rows_dtype = stream.spool_dtype
        # The processes end and their pipes are collected while Ctrl-C waits: a KeyboardInterrupt raised inside
        # a finalizer (multiprocessing's Connection.__del__, which the cyclic GC may run at any later moment)
        # would be printed as ignored and lost, and prepare would go on
        with ctrl_c_deferred():
            pool.close()
            writer.close()
            pool = writer = stream = None
            gc.collect()
    except BaseException:
        with ctrl_c_deferred():
            for processes in (pool, writer):
                if processes is not None:
                    processes.terminate()
        raise
    with open(spool_path, "rb") as spool:
        for first in range(0, len(valid_rows), WRITE_CHUNK):
            block = read_spool_rows(spool, valid_rows[first:first + WRITE_CHUNK], sample_length,
                                    rows_dtype)  # [b, S+1]
            counts -= np.bincount(block.reshape(-1), minlength=vocab_size)
    timings["write"] = time.time() - tic
    os.remove(spool_path)
    np.save(os.path.join(temp_dir, TOKEN_COUNTS_FILE), counts)

    domains = [domain.name for domain in corpus.domains]
    valid_domain, train_domain = split_domains["valid"], split_domains["train"]
    meta = {
        "format": FORMAT_VERSION,
        "vocab_size": int(vocab_size),
        "seq_length": int(seq_length),
        "sample_length": int(sample_length),
        "domains": domains,
        "train_samples": int(len(train_domain)),
        "valid_samples": int(len(valid_domain)),
        "domain_samples": {name: {"train": int((train_domain == d).sum()), "valid": int((valid_domain == d).sum())}
                           for d, name in enumerate(domains)},
        "domain_tokens": {name: int(count) for name, count in zip(domains, domain_tokens)},
        "domain_bytes": {domain.name: int(domain.bytes) for domain in corpus.domains},
        "files": corpus.file_count,
        "skipped_files": len(corpus.skipped),
        "skipped_examples": corpus.skipped[:20],
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(model_path),
        "tokenizer_source": "trained" if tokenizer is None else os.path.abspath(tokenizer),
        "model_type": model_type if tokenizer is None else None,
        "tokenizer_sampling": sampling if tokenizer is None else None,
        "tokenizer_sample_chars": sample_budget,
        "character_coverage": character_coverage if tokenizer is None else None,
        "eos_id": int(processor.eos_id()),
        "unk_id": int(processor.unk_id()),
        "unk_tokens": int(counts[processor.unk_id()]) if processor.unk_id() >= 0 else 0,
        "valid_fraction": float(valid_fraction),
        "min_valid_per_domain": int(min_valid_per_domain),
        "seed": int(seed),
        "splits": splits,
        "token_counts": TOKEN_COUNTS_FILE,
        "workers": int(workers),
        "timings": {stage: round(seconds, 3) for stage, seconds in timings.items()},
        "input_bytes": int(corpus.bytes),
        "seconds": round(time.time() - started, 2),
    }
    meta["meta_sha256"] = meta_digest(meta)
    with open(os.path.join(temp_dir, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def prepare(input_dir, output_dir, vocab_size=None, seq_length=DEFAULT_SEQ_LENGTH,
            valid_fraction=DEFAULT_VALID_FRACTION, tokenizer=None, model_type="bpe", overwrite=False,
            seed=1234, max_chars=DEFAULT_MAX_CHARS, progress_every=DEFAULT_PROGRESS_SECONDS, workers=None,
            shard_bytes=DEFAULT_SHARD_BYTES, tokenizer_sampling="proportional",
            character_coverage=DEFAULT_CHARACTER_COVERAGE, min_valid_per_domain=DEFAULT_MIN_VALID_PER_DOMAIN,
            on_commit=None):
    """Prepares input_dir into output_dir and returns meta (the dict written to meta.json).

    vocab_size None means DEFAULT_VOCAB_SIZE when training, the model's own size with tokenizer.
    max_chars caps the text used to train the tokenizer (split over the domains by
    tokenizer_sampling); all text is tokenized. progress_every: seconds between stderr
    progress lines (0 = quiet). workers: encode/write processes (None: the machine's cores).
    Raises ConfigError for bad input; output_dir is then left as it was (and on Ctrl-C too).
    on_commit() runs as soon as the output is in place, before Ctrl-C is taken again (the command
    passes settle_for_exit: from there it only reports and exits). workers > 1 starts processes
    (forkserver): a script calling this needs the usual `if __name__ == "__main__":` guard.
    """
    workers = default_workers() if workers is None else workers
    check_arguments(vocab_size, seq_length, valid_fraction, max_chars, seed, model_type, workers, shard_bytes,
                    tokenizer_sampling, character_coverage, min_valid_per_domain)
    if not (isinstance(progress_every, (int, float)) and not isinstance(progress_every, bool) and progress_every >= 0):
        raise ConfigError("progress_every", progress_every, "seconds between progress lines >= 0 (0 = quiet)")
    input_dir, output_dir = check_paths(input_dir, output_dir, overwrite)
    try:
        with built_in_temp(output_dir, on_commit, log) as temp_dir:  # the commit: never half done
            meta = build(temp_dir, input_dir, vocab_size, seq_length, valid_fraction, tokenizer, model_type,
                         max_chars, seed, progress_every, workers, shard_bytes, tokenizer_sampling,
                         character_coverage, min_valid_per_domain)
    except InputChanged as error:
        raise ConfigError("input", error.path, f"a file that stays as the scan found it until prepare ends; it "
                                               f"changed or vanished meanwhile ({error.reason})") from None
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pangu_sigma.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="corpus folder: one subfolder per domain")
    parser.add_argument("--output", required=True, help="folder to create with the prepared data")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"tokenizer vocabulary to train (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH,
                        help="model sequence length; samples hold seq_length + 1 tokens")
    parser.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION,
                        help="share of each domain's samples in the valid split (0: no valid split)")
    parser.add_argument("--min-valid-per-domain", type=int, default=DEFAULT_MIN_VALID_PER_DOMAIN,
                        help="valid samples per domain at least (capped at half the domain)")
    parser.add_argument("--tokenizer", default=None, help="existing SentencePiece .model to use instead of training")
    parser.add_argument("--model-type", default="bpe", help="tokenizer to train: bpe or unigram")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help="characters of text used to train the tokenizer")
    parser.add_argument("--tokenizer-sampling", default="proportional",
                        help="split of --max-chars over the domains: proportional (to their size) or equal")
    parser.add_argument("--character-coverage", type=float, default=DEFAULT_CHARACTER_COVERAGE,
                        help="share of the sample's characters that get their own piece (rest: byte fallback)")
    parser.add_argument("--workers", type=int, default=None, help="encode/write processes (default: the cores)")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                        help="tokens per MindRecord shard, in MiB")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split")
    parser.add_argument("--overwrite", action="store_true", help="replace --output once the new data is complete")
    parser.add_argument("--progress-every", type=float, default=DEFAULT_PROGRESS_SECONDS,
                        help="seconds between progress lines (0 = quiet)")
    args = parser.parse_args(argv)
    try:
        with sigterm_raises():
            end_quiet_start()  # in the body: SIGTERM goes from the start-up's hold to Terminated, never the default
            if not args.shard_mb > 0:
                raise ConfigError("--shard-mb", args.shard_mb, "a shard size in MiB > 0")
            meta = prepare(args.input, args.output, vocab_size=args.vocab_size, seq_length=args.seq_length,
                           valid_fraction=args.valid_fraction, tokenizer=args.tokenizer, model_type=args.model_type,
                           overwrite=args.overwrite, seed=args.seed, max_chars=args.max_chars,
                           progress_every=args.progress_every, workers=args.workers,
                           shard_bytes=max(1, int(args.shard_mb * 2**20)),
                           tokenizer_sampling=args.tokenizer_sampling,
                           character_coverage=args.character_coverage, min_valid_per_domain=args.min_valid_per_domain,
                           on_commit=settle_for_exit)  # no Ctrl-C can make "nothing written" untrue
    except ConfigError as error:
        settle_for_exit()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        settle_for_exit()
        terminated = isinstance(interrupt, Terminated)
        print(f"prepare: interrupted{' (SIGTERM)' if terminated else ''}; nothing written, "
              f"{os.path.abspath(args.output)} is as it was", file=sys.stderr)
        return 143 if terminated else 130
    if meta["skipped_files"]:
        print(f"warning: skipped {meta['skipped_files']} file(s) that are not UTF-8 text, e.g. "
              f"{', '.join(meta['skipped_examples'][:3])}", file=sys.stderr)
    capped = [f"{name} ({counts['valid']} of {counts['train'] + counts['valid']} samples)"
              for name, counts in meta["domain_samples"].items() if counts["valid"] < meta["min_valid_per_domain"]]
    if capped and meta["valid_fraction"] > 0:
        print(f"note: --min-valid-per-domain {meta['min_valid_per_domain']} capped at half the domain for "
              f"{', '.join(capped)}", file=sys.stderr)
    elif meta["valid_fraction"] == 0 and args.min_valid_per_domain != DEFAULT_MIN_VALID_PER_DOMAIN:
        print("note: --min-valid-per-domain has no effect with --valid-fraction 0 (no valid split)", file=sys.stderr)
    per_domain = ", ".join(f"{name} {counts['train']}+{counts['valid']}" for name, counts in meta["domain_samples"].items())
    shards = sum(len(entry["shards"]) for entry in meta["splits"].values())
    print(f"wrote {os.path.abspath(args.output)}: {meta['train_samples']} train + {meta['valid_samples']} valid "
          f"samples of {meta['sample_length']} tokens in {shards} shards (vocab {meta['vocab_size']}; {per_domain}) "
          f"in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
