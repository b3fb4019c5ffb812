"""The SentencePiece tokenizer: a bounded, reproducible training sample of the corpus, training, loading.

Sample: at most max_chars characters of whole lines. The budget is split over the
domains in proportion to their size in characters ("proportional", the default) or
evenly ("equal"); inside a domain lines are taken evenly spread over the whole domain
(a deterministic systematic sample: a line is taken when the running share
fraction * characters-seen has grown by its length), so the sample depends only on
the corpus and the budget, and memory holds one file piece at a time.
"""
import hashlib
import os
import re

import sentencepiece as spm

from locmoe.errors import ConfigError, Terminated
from pangu_sigma.data.corpus import file_pieces, read_piece

TRAINER_THREADS = 4  # fixed: the unigram trainer's result depends on the thread count
SAMPLING = ("proportional", "equal")
DEFAULT_CHARACTER_COVERAGE = 0.9995


def domain_budgets(domains, max_chars, sampling):
    """Characters of training text per domain. # [D]"""
    if sampling == "equal":
        return [min(domain.chars, max_chars // len(domains)) for domain in domains]
    total = sum(domain.chars for domain in domains)
    return [min(domain.chars, max_chars * domain.chars // max(total, 1)) for domain in domains]


def domain_lines(domain, budget):
    """Non-empty lines spread evenly over the domain, about budget characters in all."""
    if budget <= 0 or domain.chars == 0:
        return
    fraction = min(1.0, budget / domain.chars)
    credit, used = 0.0, 0
    for path, size in zip(domain.files, domain.sizes):
        for start, end in file_pieces(size):
            for line in read_piece(path, start, end).split("\n"):
                credit += fraction * (len(line) + 1)
                if credit < len(line) + 1:
                    continue
                credit -= len(line) + 1
                if line:
                    used += len(line)
                    if used > budget:
                        return
                    yield line


def training_lines(domains, budgets):
    for domain, budget in zip(domains, budgets):
        yield from domain_lines(domain, budget)


def sentencepiece_message(error):
    """The human part of a SentencePiece RuntimeError, on one line."""
    text = " ".join(str(error).split())
    return text.rsplit("] ", 1)[-1]


def train_tokenizer(domains, model_path, vocab_size, model_type, max_chars, sampling, character_coverage):
    """Trains a byte-fallback SentencePiece model that round-trips any text exactly.

    Identity normalization, no dummy prefix and kept whitespace make decode(encode(t)) == t;
    "\\n" is its own piece (training sees single lines, documents keep their newlines).
    Returns (processor, {domain: sampled characters budget}).
    """
    budgets = domain_budgets(domains, max_chars, sampling)
    try:
        with open(model_path, "wb") as model_file:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_lines(domains, budgets), model_writer=model_file,
                vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
                character_coverage=character_coverage, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                split_digits=True, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=TRAINER_THREADS, minloglevel=2)
    except RuntimeError as error:
        for interrupt in (Terminated, KeyboardInterrupt):  # raised inside the sentence iterator, wrapped
            if interrupt.__name__ in str(error):
                raise interrupt() from None
        message = sentencepiece_message(error)
        raise vocab_error(vocab_size, message, character_coverage, sampling) or ConfigError(
            "input", "tokenizer training text", f"text SentencePiece can train on ({message})") from None
    processor = spm.SentencePieceProcessor(model_file=model_path)
    return processor, {domain.name: budget for domain, budget in zip(domains, budgets)}


def vocab_error(vocab_size, message, character_coverage, sampling):
    """A ConfigError naming vocab_size when SentencePiece rejected the size, else None."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return ConfigError("vocab_size", vocab_size,
                           f"at least {too_small.group(1)} pieces for the characters of this tokenizer sample "
                           f"(256 bytes + specials + characters covering {character_coverage} of the text); "
                           f"raise --vocab-size, lower --character-coverage (now {character_coverage}; rarer "
                           f"characters then fall back to bytes) or change --tokenizer-sampling (now {sampling})")
    too_large = re.search(r"Vocabulary size too high.*<= (\d+)", message)
    if too_large:
        return ConfigError("vocab_size", vocab_size, f"at most {too_large.group(1)} for this corpus "
                           f"(more text, or a larger --max-chars, allows a larger vocabulary)")
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


def file_sha256(path, block=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
