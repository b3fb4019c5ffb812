"""Corpus folder -> tokenizer + packed MindRecord samples with a domain id each.

    python -m pangu_sigma.data.prepare --input CORPUS --output DATA [--vocab-size N]
        [--seq-length S] [--valid-fraction F] [--tokenizer MODEL] [--model-type bpe|unigram]
        [--max-chars N] [--seed N] [--overwrite]

CORPUS has one subfolder per domain (domain ids follow the sorted names); a flat
folder of files is one domain named "default". Every file below a domain folder
(recursively, hidden ones excluded, sorted by path) is one document: it is read as
UTF-8 (files that are not are skipped and reported), tokenized, followed by EOS,
and the token stream of each domain is cut into samples of seq_length + 1 tokens
(the tail shorter than one sample is dropped). The whole corpus is held in memory.

DATA receives tokenizer.model, train.mindrecord, valid.mindrecord (fields
input_ids int32 [S+1], domain_id int32), token_counts.npy (int64 [vocab], train
split) and meta.json. It is built in a temporary folder next to DATA and renamed
into place only when complete.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm

from locmoe.errors import ConfigError

DEFAULT_VOCAB_SIZE = 2000
DEFAULT_SEQ_LENGTH = 64
DEFAULT_VALID_FRACTION = 0.01
DEFAULT_MAX_CHARS = 10_000_000
TRAINER_THREADS = 4  # fixed: the unigram trainer's result depends on the thread count
WRITE_CHUNK = 4096
HEADER_BYTES = 1 << 17  # MindRecord's defaults (16 MB header, 32 MB pages) make a tiny split 48 MB
MAX_PAGES = 256  # a 128 KB header holds the metadata of this many pages with room to spare
TOKENIZER_FILE = "tokenizer.model"
SPLIT_FILES = {"train": "train.mindrecord", "valid": "valid.mindrecord"}
TOKEN_COUNTS_FILE = "token_counts.npy"
META_FILE = "meta.json"


def log(message):
    """Progress goes to stderr so stdout stays for the final summary."""
    print(f"prepare: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def check_arguments(vocab_size, seq_length, valid_fraction, max_chars, seed, model_type):
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


def check_paths(input_dir, output_dir, overwrite):
    input_dir = os.path.abspath(input_dir)
    output_dir = os.path.abspath(output_dir)
    if not os.path.isdir(input_dir):
        raise ConfigError("input", input_dir, "an existing folder (one subfolder per domain, or text files)")
    if os.path.commonpath([input_dir, output_dir]) in (input_dir, output_dir):
        raise ConfigError("output", output_dir, f"a folder outside the input folder {input_dir} and not containing it")
    if os.path.lexists(output_dir):
        if not overwrite:
            raise ConfigError("output", output_dir, "a folder that does not exist yet (pass --overwrite to replace it)")
        if not os.path.isdir(output_dir) or os.path.islink(output_dir):
            raise ConfigError("output", output_dir, "a folder to replace (it exists but is not a folder)")
    return input_dir, output_dir


# ------------------------------------------------------------------- corpus


def list_files(folder):
    """Non-hidden files below folder, recursively, sorted by relative path parts."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, name) for name in files if not name.startswith("."))
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def find_domains(input_dir):
    """[(domain_name, folder)], sorted by name; a flat folder is the one domain "default"."""
    entries = sorted(e for e in os.listdir(input_dir) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(input_dir, e))]
    loose = [e for e in entries if not os.path.isdir(os.path.join(input_dir, e))]
    if subdirs and loose:
        raise ConfigError("input", input_dir,
                          f"either only domain subfolders or only files, not both (files {loose[:3]} "
                          f"next to subfolders {subdirs[:3]})")
    if not entries:
        raise ConfigError("input", input_dir, "a folder with text files; it is empty")
    if not subdirs:
        return [("default", input_dir)]
    return [(name, os.path.join(input_dir, name)) for name in subdirs]


def read_corpus(input_dir, progress_every):
    """Returns (domains, texts_per_domain, skipped_paths, file_count)."""
    domain_dirs = find_domains(input_dir)
    file_lists = [list_files(folder) for _, folder in domain_dirs]
    total = sum(len(files) for files in file_lists)
    if total == 0:
        raise ConfigError("input", input_dir, "a folder with text files; it holds no files")
    texts_per_domain, skipped, done = [], [], 0
    for files in file_lists:
        texts = []
        for path in files:
            with open(path, "rb") as handle:
                raw = handle.read()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(os.path.relpath(path, input_dir))
            done += 1
            if progress_every and done % progress_every == 0:
                log(f"read {done}/{total} files")
        texts_per_domain.append(texts)
    if not any(text for texts in texts_per_domain for text in texts):
        raise ConfigError("input", input_dir,
                          f"at least one non-empty UTF-8 text file; found none ({len(skipped)} of "
                          f"{total} files skipped as not UTF-8)")
    return [name for name, _ in domain_dirs], texts_per_domain, skipped, total


# ---------------------------------------------------------------- tokenizer


def training_lines(texts_per_domain, max_chars):
    """Non-empty lines for tokenizer training, at most max_chars/num_domains chars per domain."""
    budget = max(1, max_chars // len(texts_per_domain))
    for texts in texts_per_domain:
        yield from domain_lines(texts, budget)


def domain_lines(texts, budget):
    used = 0
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            used += len(line)
            if used > budget:
                return
            yield line


def sentencepiece_message(error):
    """The human part of a SentencePiece RuntimeError, on one line."""
    text = " ".join(str(error).split())
    return text.rsplit("] ", 1)[-1]


def train_tokenizer(texts_per_domain, model_path, vocab_size, model_type, max_chars):
    """Trains a byte-fallback SentencePiece model that round-trips any text exactly.

    Identity normalization, no dummy prefix and kept whitespace make decode(encode(t)) == t;
    "\\n" is its own piece (training sees single lines, documents keep their newlines).
    """
    try:
        with open(model_path, "wb") as model_file:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_lines(texts_per_domain, max_chars), model_writer=model_file,
                vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
                character_coverage=0.9995, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                split_digits=True, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=TRAINER_THREADS, minloglevel=2)
    except RuntimeError as error:
        message = sentencepiece_message(error)
        raise vocab_error(vocab_size, message) or ConfigError(
            "input", "tokenizer training text", f"text SentencePiece can train on ({message})") from None
    return spm.SentencePieceProcessor(model_file=model_path)


def vocab_error(vocab_size, message):
    """A ConfigError naming vocab_size when SentencePiece rejected the size, else None."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return ConfigError("vocab_size", vocab_size,
                           f"at least {too_small.group(1)} for this corpus (256 byte pieces + special "
                           f"pieces + its characters)")
    too_large = re.search(r"Vocabulary size too high.*<= (\d+)", message)
    if too_large:
        return ConfigError("vocab_size", vocab_size, f"at most {too_large.group(1)} for this corpus "
                           f"(more text allows a larger vocabulary)")
    return None


def load_tokenizer(path, vocab_size):
    if not os.path.isfile(path):
        raise ConfigError("tokenizer", path, "an existing SentencePiece .model file")
    try:
        processor = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise ConfigError("tokenizer", path, f"a SentencePiece .model file ({sentencepiece_message(error)})") from None
    if processor.eos_id() < 0:
        raise ConfigError("tokenizer", path, "a SentencePiece model with an EOS piece (eos_id >= 0)")
    if vocab_size is not None and vocab_size != processor.vocab_size():
        raise ConfigError("vocab_size", vocab_size,
                          f"{processor.vocab_size()} (the vocabulary of --tokenizer {path}), or omit it")
    return processor


# ------------------------------------------------------------ pack and split


def tokenize_domain(processor, texts, progress):
    """One domain's documents -> one token stream, EOS after each document. # [T]"""
    eos = processor.eos_id()
    pieces = []
    for text in texts:
        if text:
            pieces.append(np.asarray(processor.encode(text), dtype=np.int32))
            pieces.append(np.array([eos], dtype=np.int32))
        progress()
    return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def pack(stream, sample_length):
    """[T] -> [N, S+1]: consecutive non-overlapping samples; the short tail is dropped."""
    count = len(stream) // sample_length
    return stream[: count * sample_length].reshape(count, sample_length)


def choose_valid(num_samples, valid_fraction, seed):
    """Sorted sample indices for the valid split; >= 1 when there are >= 2 samples, train keeps >= 1."""
    if num_samples < 2:
        return np.zeros([0], np.int64)
    num_valid = min(num_samples - 1, max(1, int(round(num_samples * valid_fraction))))
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:num_valid])


# ------------------------------------------------------------------- output


def page_bytes(data_bytes):
    """The smallest power-of-two MindRecord page (32 KB .. 256 MB) that keeps the page count <= MAX_PAGES."""
    size = 1 << 15
    while size * MAX_PAGES < data_bytes and size < (1 << 28):
        size <<= 1
    return size


def write_mindrecord(path, input_ids, domain_ids):
    """input_ids [N, S+1] int32, domain_ids [N] int32 -> one MindRecord file (+ its .db index)."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(path, shard_num=1, overwrite=False)
    writer.set_header_size(HEADER_BYTES)
    writer.set_page_size(page_bytes(input_ids.nbytes))
    writer.add_schema({"input_ids": {"type": "int32", "shape": [input_ids.shape[1]]},
                       "domain_id": {"type": "int32"}}, "pangu_sigma_samples")
    for start in range(0, len(input_ids), WRITE_CHUNK):
        rows = [{"input_ids": ids, "domain_id": np.int32(domain)}
                for ids, domain in zip(input_ids[start:start + WRITE_CHUNK], domain_ids[start:start + WRITE_CHUNK])]
        writer.write_raw_data(rows)
    writer.commit()


def make_temp_dir(output_dir):
    """An empty folder next to output_dir, with the permissions a plain mkdir would give."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_dir, 0o777 & ~umask)
    return temp_dir


def move_into_place(temp_dir, output_dir):
    """Renames the finished temp folder to output_dir; an old output_dir is removed only afterwards."""
    old_dir = None
    if os.path.lexists(output_dir):
        old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=os.path.dirname(output_dir))
        os.rmdir(old_dir)
        os.rename(output_dir, old_dir)
    os.rename(temp_dir, output_dir)
    if old_dir:
        shutil.rmtree(old_dir)


def build(temp_dir, input_dir, vocab_size, seq_length, valid_fraction, tokenizer, model_type, max_chars,
          seed, progress_every):
    """Does all the work inside temp_dir and returns meta."""
    started = time.time()
    given_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer, vocab_size)
    domains, texts_per_domain, skipped, file_count = read_corpus(input_dir, progress_every)
    model_path = os.path.join(temp_dir, TOKENIZER_FILE)
    if given_tokenizer is None:
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        if progress_every:
            log(f"training a {model_type} tokenizer, vocab {vocab_size}")
        processor = train_tokenizer(texts_per_domain, model_path, vocab_size, model_type, max_chars)
    else:
        processor = given_tokenizer
        shutil.copyfile(tokenizer, model_path)
    vocab_size = processor.vocab_size()

    sample_length = seq_length + 1
    done = [0]

    def progress():
        done[0] += 1
        if progress_every and done[0] % progress_every == 0:
            log(f"tokenized {done[0]}/{file_count - len(skipped)} files")

    samples, domain_tokens = [], {}
    for name, texts in zip(domains, texts_per_domain):
        stream = tokenize_domain(processor, texts, progress)  # [T]
        domain_tokens[name] = int(len(stream))
        if len(stream) < sample_length:
            raise ConfigError("input", input_dir,
                              f"enough text for one sample of seq_length+1={sample_length} tokens in every "
                              f"domain; domain {name!r} has {len(stream)} tokens")
        samples.append(pack(stream, sample_length))  # [N_d, S+1]
    input_ids = np.concatenate(samples)  # [N, S+1]
    domain_ids = np.concatenate([np.full(len(s), d, np.int32) for d, s in enumerate(samples)])  # [N]

    is_valid = np.zeros(len(input_ids), bool)
    is_valid[choose_valid(len(input_ids), valid_fraction, seed)] = True
    for split, mask in (("train", ~is_valid), ("valid", is_valid)):
        write_mindrecord(os.path.join(temp_dir, SPLIT_FILES[split]), input_ids[mask], domain_ids[mask])
    token_counts = np.bincount(input_ids[~is_valid].reshape(-1), minlength=vocab_size).astype(np.int64)  # [V]
    np.save(os.path.join(temp_dir, TOKEN_COUNTS_FILE), token_counts)

    meta = {
        "vocab_size": int(vocab_size),
        "seq_length": int(seq_length),
        "sample_length": int(sample_length),
        "domains": domains,
        "train_samples": int((~is_valid).sum()),
        "valid_samples": int(is_valid.sum()),
        "domain_samples": {name: {"train": int(((domain_ids == d) & ~is_valid).sum()),
                                  "valid": int(((domain_ids == d) & is_valid).sum())}
                           for d, name in enumerate(domains)},
        "domain_tokens": domain_tokens,
        "files": file_count,
        "skipped_files": len(skipped),
        "skipped_examples": skipped[:20],
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_source": "trained" if tokenizer is None else os.path.abspath(tokenizer),
        "model_type": model_type if tokenizer is None else None,
        "eos_id": int(processor.eos_id()),
        "unk_id": int(processor.unk_id()),
        "unk_tokens": int((input_ids == processor.unk_id()).sum()),
        "valid_fraction": float(valid_fraction),
        "seed": int(seed),
        "split_files": dict(SPLIT_FILES),
        "token_counts": TOKEN_COUNTS_FILE,
        "seconds": round(time.time() - started, 2),
    }
    with open(os.path.join(temp_dir, META_FILE), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def prepare(input_dir, output_dir, vocab_size=None, seq_length=DEFAULT_SEQ_LENGTH,
            valid_fraction=DEFAULT_VALID_FRACTION, tokenizer=None, model_type="bpe", overwrite=False,
            seed=1234, max_chars=DEFAULT_MAX_CHARS, progress_every=200):
    """Prepares input_dir into output_dir and returns meta (the dict written to meta.json).

    vocab_size None means DEFAULT_VOCAB_SIZE when training, the model's own size with tokenizer.
    max_chars caps the text used to train the tokenizer (split evenly across domains); all text
    is tokenized. progress_every: a stderr line per that many files (0 = quiet).
    Raises ConfigError for bad input; output_dir is then left as it was.
    """
    check_arguments(vocab_size, seq_length, valid_fraction, max_chars, seed, model_type)
    if not (isinstance(progress_every, int) and progress_every >= 0):
        raise ConfigError("progress_every", progress_every, "an integer >= 0 (0 = quiet)")
    input_dir, output_dir = check_paths(input_dir, output_dir, overwrite)
    temp_dir = make_temp_dir(output_dir)
    try:
        meta = build(temp_dir, input_dir, vocab_size, seq_length, valid_fraction, tokenizer, model_type,
                     max_chars, seed, progress_every)
        move_into_place(temp_dir, output_dir)
    finally:
        if os.path.isdir(temp_dir):
            shutil.rmtree(temp_dir)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pangu_sigma.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="corpus folder: one subfolder per domain")
    parser.add_argument("--output", required=True, help="folder to create with the prepared data")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"tokenizer vocabulary to train (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH,
                        help="model sequence length; samples hold seq_length + 1 tokens")
    parser.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION)
    parser.add_argument("--tokenizer", default=None, help="existing SentencePiece .model to use instead of training")
    parser.add_argument("--model-type", default="bpe", help="tokenizer to train: bpe or unigram")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help="characters of text used to train the tokenizer")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split")
    parser.add_argument("--overwrite", action="store_true", help="replace --output once the new data is complete")
    parser.add_argument("--progress-every", type=int, default=200, help="a progress line per N files (0 = quiet)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.input, args.output, vocab_size=args.vocab_size, seq_length=args.seq_length,
                       valid_fraction=args.valid_fraction, tokenizer=args.tokenizer, model_type=args.model_type,
                       overwrite=args.overwrite, seed=args.seed, max_chars=args.max_chars,
                       progress_every=args.progress_every)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if meta["skipped_files"]:
        print(f"warning: skipped {meta['skipped_files']} file(s) that are not UTF-8 text, e.g. "
              f"{', '.join(meta['skipped_examples'][:3])}", file=sys.stderr)
    per_domain = ", ".join(f"{name} {counts['train']}+{counts['valid']}" for name, counts in meta["domain_samples"].items())
    print(f"wrote {os.path.abspath(args.output)}: {meta['train_samples']} train + {meta['valid_samples']} valid "
          f"samples of {meta['sample_length']} tokens (vocab {meta['vocab_size']}; {per_domain}) "
          f"in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
