"""Data pipeline: prepare (corpus -> MindRecord), dataset (batches, sharding, resume), default corpus."""
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm

from locmoe.errors import ConfigError
from pangu_sigma.data import prepare as prepare_module
from pangu_sigma.data.dataset import create_dataset, num_batches, read_meta
from pangu_sigma.data.default_corpus import build_default_corpus
from pangu_sigma.data.prepare import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 400
SEQ = 16

PROSE = {
    "rivers.txt": (
        "Rivers carry water from high ground to the sea, and along the way they shape the land. "
        "A young river runs fast and cuts a narrow valley; an old river moves slowly across a wide plain "
        "and drops the sand and mud it carried from the hills.\n\n"
        "People have always settled near rivers. The water was used for drinking, for fields and for "
        "trade, and the first cities of the world grew on the banks of great rivers such as the Nile, "
        "the Tigris and the Euphrates.\n"),
    "weather.txt": (
        "The weather changes from day to day, but the climate of a place is the pattern of weather "
        "over many years. Warm air rises, cools and can no longer hold all of its water, so clouds form "
        "and rain falls.\n\n"
        "Forecasters measure the pressure, the temperature and the wind at many stations, and computer "
        "models use these numbers to predict how the air will move during the next few days. "
        "A forecast is never certain; it is a statement about what is likely.\n"),
    "library.txt": (
        "A public library lends books to anyone who lives in the town. Readers can borrow novels, "
        "history and science books, and they can also read newspapers in a quiet room. "
        "Librarians help people find what they need and teach children how to search for information. "
        "Naïve readers and café owners alike are welcome.\n"),
}
CODE = {
    "stack.py.txt": (
        "class Stack:\n"
        "    \"\"\"A last-in, first-out collection.\"\"\"\n\n"
        "    def __init__(self):\n"
        "        self.items = []\n\n"
        "    def push(self, item):\n"
        "        self.items.append(item)\n\n"
        "    def pop(self):\n"
        "        if not self.items:\n"
        "            raise IndexError(\"pop from an empty stack\")\n"
        "        return self.items.pop()\n\n"
        "    def __len__(self):\n"
        "        return len(self.items)\n"),
    "mathutil.py.txt": (
        "import math\n\n\n"
        "def mean(values):\n"
        "    return sum(values) / len(values)\n\n\n"
        "def variance(values):\n"
        "    center = mean(values)\n"
        "    return sum((value - center) ** 2 for value in values) / len(values)\n\n\n"
        "def distance(a, b):\n"
        "    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))\n\n\n"
        "for index in range(10):\n"
        "    print(index, mean([index, index + 1]), distance((0, 0), (index, 1)))\n"),
    os.path.join("nested", "wordcount.py.txt"): (
        "from collections import Counter\n\n\n"
        "def count_words(path):\n"
        "    counts = Counter()\n"
        "    with open(path, encoding=\"utf-8\") as handle:\n"
        "        for line in handle:\n"
        "            counts.update(line.lower().split())\n"
        "    return counts.most_common(10)\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    for word, count in count_words(\"notes.txt\"):\n"
        "        print(f\"{word:>12} {count}\")\n"),
}
INVALID_UTF8 = b"caf\xe9 au lait \xff\xfe not utf-8\n"


def write_corpus(root, domains):
    """domains: {name: {relative path: str or bytes}}."""
    for domain, files in domains.items():
        for relative, content in files.items():
            path = os.path.join(root, domain, relative) if domain else os.path.join(root, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(root)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus", {"en": dict(PROSE, **{"zz_bad.txt": INVALID_UTF8}), "code": CODE})
    output = str(root / "prepared")
    meta = prepare(corpus, output, vocab_size=VOCAB, seq_length=SEQ, valid_fraction=0.2, progress_every=0,
                   workers=1)
    return corpus, output, meta


def read_all(output, split, **kwargs):
    """[(tuple of tokens, domain id)] of a split, one sample per batch."""
    dataset = create_dataset(output, split, batch_size=1, repeat=False, drop_remainder=False, **kwargs)
    return [(tuple(row["input_ids"][0].tolist()), int(row["domain_id"][0]))
            for row in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]


def take_batches(dataset, count):
    batches = []
    for row in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        batches.append((row["input_ids"].copy(), row["domain_id"].copy()))
        if len(batches) == count:
            break
    return batches


def expected_samples(corpus, model_path):
    """Independent re-tokenization: per domain (sorted), files sorted, EOS per document, packed by SEQ+1."""
    processor = spm.SentencePieceProcessor(model_file=model_path)
    samples = []
    for domain_id, domain in enumerate(sorted(os.listdir(corpus))):
        stream = []
        paths = sorted((os.path.relpath(os.path.join(dirpath, name), corpus)
                        for dirpath, _, names in os.walk(os.path.join(corpus, domain)) for name in names),
                       key=lambda relative: relative.split(os.sep))
        for relative in paths:
            with open(os.path.join(corpus, relative), "rb") as handle:
                try:
                    text = handle.read().decode("utf-8")
                except UnicodeDecodeError:
                    continue
            stream += processor.encode(text) + [processor.eos_id()]
        for start in range(0, len(stream) - SEQ, SEQ + 1):
            samples.append((tuple(stream[start:start + SEQ + 1]), domain_id))
    return samples


def test_round_trip_train_and_valid_equal_independent_tokenization(prepared):
    corpus, output, meta = prepared
    expected = expected_samples(corpus, os.path.join(output, meta["tokenizer"]))
    train, valid = read_all(output, "train", shuffle=False), read_all(output, "valid", shuffle=False)
    assert meta["domains"] == ["code", "en"]
    assert (len(train), len(valid)) == (meta["train_samples"], meta["valid_samples"])
    for domain_id, name in enumerate(meta["domains"]):  # stratified: round(0.2 n_d), >= 8, <= n_d // 2
        n = sum(1 for _, d in expected if d == domain_id)
        assert meta["domain_samples"][name]["valid"] == min(max(8, round(0.2 * n)), n // 2)
    # train and valid are complementary subsequences of the packed stream, in stream order
    pending_train, pending_valid = list(train), list(valid)
    for sample in expected:
        if pending_train and pending_train[0] == sample:
            pending_train.pop(0)
        else:
            assert pending_valid and pending_valid[0] == sample
            pending_valid.pop(0)
    assert not pending_train and not pending_valid
    for domain_id, name in enumerate(meta["domains"]):
        counts = meta["domain_samples"][name]
        assert counts["train"] == sum(1 for _, d in train if d == domain_id)
        assert counts["valid"] == sum(1 for _, d in valid if d == domain_id)
    token_counts = np.load(os.path.join(output, "token_counts.npy"))
    assert token_counts.dtype == np.int64 and token_counts.shape == (VOCAB,)
    assert (token_counts == np.bincount(np.array([s for s, _ in train]).ravel(), minlength=VOCAB)).all()
    processor = spm.SentencePieceProcessor(model_file=os.path.join(output, "tokenizer.model"))
    odd_text = "Naïve café — 漢字 ☃\n\tindent  two  spaces\r\n"
    assert processor.decode(processor.encode(odd_text)) == odd_text  # byte fallback round-trips any text
    assert read_meta(output)["vocab_size"] == VOCAB


def test_batches_have_the_documented_shapes(prepared):
    _, output, _ = prepared
    (input_ids, domain_ids), = take_batches(create_dataset(output, "train", batch_size=3), 1)
    assert input_ids.shape == (3, SEQ + 1) and input_ids.dtype == np.int32
    assert domain_ids.shape == (3,) and domain_ids.dtype == np.int32


def test_skipped_file_is_counted_and_reported(prepared, tmp_path, capsys):
    corpus, _, meta = prepared
    assert meta["skipped_files"] == 1 and meta["skipped_examples"] == [os.path.join("en", "zz_bad.txt")]
    code = prepare_module.main(["--input", corpus, "--output", str(tmp_path / "out"), "--vocab-size", str(VOCAB),
                                "--seq-length", str(SEQ), "--progress-every", "1e-9", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped 1 file(s) that are not UTF-8 text" in captured.err
    assert "prepare: encode " in captured.err and " MB/s, ETA " in captured.err  # progress lines
    assert "train +" in captured.out


def test_sharding_partitions_the_samples(prepared):
    _, output, meta = prepared
    everything = Counter(read_all(output, "train", shuffle=False))
    for dp_size in (2, 3):
        shards = [read_all(output, "train", shuffle=True, seed=7, dp_size=dp_size, dp_rank=rank)
                  for rank in range(dp_size)]
        assert len({len(shard) for shard in shards}) == 1  # equal shard sizes
        union = sum((Counter(shard) for shard in shards), Counter())
        assert sum(union.values()) == meta["train_samples"] - meta["train_samples"] % dp_size
        assert not union - everything  # disjoint shards drawn from the split
    assert read_all(output, "train", shuffle=True, seed=7) != read_all(output, "train", shuffle=False)


@pytest.mark.parametrize("dp_size, dp_rank", [(1, 0), (2, 1)])
def test_resume_continues_with_the_next_batch_across_epochs(prepared, dp_size, dp_rank):
    _, output, _ = prepared
    batch_size = 2
    per_epoch = num_batches(output, "train", batch_size, dp_size)
    assert per_epoch >= 2
    options = dict(batch_size=batch_size, dp_size=dp_size, dp_rank=dp_rank, seed=11)
    full = take_batches(create_dataset(output, "train", **options), 2 * per_epoch + 3)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full[:per_epoch], full[per_epoch:]))  # reshuffled
    for start in (per_epoch - 1, per_epoch, per_epoch + 2):
        resumed = take_batches(create_dataset(output, "train", start_batch=start, **options), 3)
        for (ids, domains), (full_ids, full_domains) in zip(resumed, full[start:start + 3]):
            assert np.array_equal(ids, full_ids) and np.array_equal(domains, full_domains)


def snapshot(folder):
    """{relative path: bytes} of every file below folder."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


TINY = {"": {"note.txt": "Just a few words.\n"}}
GOOD = {"en": PROSE, "code": CODE}
BAD_CASES = [
    # (name, corpus or None for a missing folder, extra arguments, expected message part)
    ("missing input", None, [], "is invalid: an existing folder"),
    ("empty input", {}, [], "it is empty"),
    ("no readable text", {"": {"bad.txt": INVALID_UTF8}}, [], "found none (1 of 1 files skipped as not UTF-8)"),
    ("too little text", TINY, ["--tokenizer", "{tokenizer}"], "domain 'default' has"),
    ("vocab too small", GOOD, ["--vocab-size", "100"], "vocab_size=100 is invalid: at least"),
    ("vocab too large", GOOD, ["--vocab-size", "50000"], "vocab_size=50000 is invalid: at most"),
    ("seq length", GOOD, ["--seq-length", "1"], "seq_length=1 is invalid: an integer >= 2"),
    ("valid fraction", GOOD, ["--valid-fraction", "1"], "valid_fraction=1.0 is invalid: a number in [0, 1)"),
    ("missing tokenizer", GOOD, ["--tokenizer", "nowhere.model"], "an existing SentencePiece .model file"),
    ("output exists", GOOD, ["--no-overwrite"], "pass --overwrite to replace it"),
]


@pytest.mark.parametrize("name, domains, extra, message", BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_input_is_one_line_and_leaves_output_untouched(prepared, tmp_path, capsys, name, domains, extra,
                                                           message):
    tokenizer = os.path.join(prepared[1], "tokenizer.model")
    extra = [argument.format(tokenizer=tokenizer) for argument in extra]
    corpus = str(tmp_path / "corpus")
    if domains is not None:
        os.makedirs(corpus)
        write_corpus(corpus, domains)
    output = tmp_path / "out"
    output.mkdir()
    (output / "meta.json").write_text('{"old": true}')
    (output / "train.mindrecord").write_bytes(b"old samples")
    before, parent_before = snapshot(str(output)), sorted(os.listdir(tmp_path))
    overwrite = [] if "--no-overwrite" in extra else ["--overwrite"]
    arguments = ["--input", corpus, "--output", str(output), "--seq-length", str(SEQ), "--progress-every", "0",
                 "--workers", "1"]
    code = prepare_module.main(arguments + [a for a in extra if a != "--no-overwrite"] + overwrite)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(str(output)) == before and sorted(os.listdir(tmp_path)) == parent_before


def test_cli_module_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pangu_sigma.data.prepare", "--input", str(tmp_path / "none"),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: input=")


def test_overwrite_replaces_a_finished_output(prepared, tmp_path):
    corpus, _, _ = prepared
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    meta = prepare(corpus, str(output), vocab_size=VOCAB, seq_length=SEQ, overwrite=True, progress_every=0,
                   workers=1)
    assert not (output / "stale.txt").exists() and read_meta(str(output)) == meta
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folders left


def test_read_meta_rejects_an_unprepared_folder(tmp_path):
    with pytest.raises(ConfigError, match="pangu_sigma.data.prepare"):
        read_meta(str(tmp_path))


def test_default_corpus_has_real_code_and_prose(tmp_path):
    sizes, _ = build_default_corpus(str(tmp_path / "dc"), max_bytes=120_000)
    texts = {}
    for domain in ("code", "en"):
        folder = tmp_path / "dc" / domain
        names = sorted(os.listdir(folder))
        assert names and all(name.endswith(".txt") for name in names)
        texts[domain] = "".join((folder / name).read_text(encoding="utf-8") for name in names)
        assert sizes[domain] == (len(names), len(texts[domain].encode("utf-8")))
        assert 10_000 < sizes[domain][1] <= 60_000
    assert "def " in texts["code"] and "import " in texts["code"]
    assert texts["en"].count(" the ") > 50
    build_default_corpus(str(tmp_path / "again"), max_bytes=120_000)
    assert snapshot(str(tmp_path / "dc")) == snapshot(str(tmp_path / "again"))  # deterministic
