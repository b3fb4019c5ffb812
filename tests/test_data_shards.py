"""Sharded data: streaming prepare vs shard count and worker count, sharded reading with exact resume,
damaged data reported in one line before training writes anything, Ctrl-C in one line."""
import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import yaml

from locmoe.errors import ConfigError, note_for_interrupt, run_cli
from pangu_sigma.data import prepare as prepare_module
from pangu_sigma.data.corpus import file_pieces, read_piece
from pangu_sigma.data.dataset import create_dataset, load_split, num_batches, read_domain_ids, read_meta
from pangu_sigma.data.prepare import prepare
from tests.test_data import CODE, PROSE, SEQ, VOCAB, snapshot, take_batches, write_corpus

ZH = {"poem.txt": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n" * 6,
      "tech.txt": "稀疏专家模型把每个词元路由到一个专家，负载均衡损失让专家的负载接近均匀。\n" * 5}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same corpus prepared as one shard per split (1 worker) and as many shards (2 workers)."""
    root = tmp_path_factory.mktemp("sharded")
    corpus = write_corpus(root / "corpus", {"en": PROSE, "code": CODE, "zh": ZH})
    one = prepare(corpus, str(root / "one"), vocab_size=VOCAB, seq_length=SEQ, valid_fraction=0.1,
                  progress_every=0, workers=1)
    many = prepare(corpus, str(root / "many"), vocab_size=VOCAB, seq_length=SEQ, valid_fraction=0.1,
                   progress_every=0, workers=2, shard_bytes=4 * (SEQ + 1) * 7)  # 7 samples per shard
    return corpus, str(root / "one"), one, str(root / "many"), many


def test_one_shard_and_many_shards_hold_the_same_rows(sharded):
    corpus, one, meta_one, many, meta_many = sharded
    assert [len(meta_one["splits"][s]["shards"]) for s in ("train", "valid")] == [1, 1]
    assert len(meta_many["splits"]["train"]["shards"]) == -(-meta_many["train_samples"] // 7) > 3
    assert meta_one["tokenizer_sha256"] == meta_many["tokenizer_sha256"]
    for split in ("train", "valid"):
        ids_one, domains_one = load_split(one, split)
        ids_many, domains_many = load_split(many, split)
        assert np.array_equal(ids_one, ids_many) and np.array_equal(domains_one, domains_many)
        assert np.array_equal(read_domain_ids(many, split), domains_many)
    # every domain has valid samples (stratified, at least min(8, n_d // 2))
    assert all(counts["valid"] >= 1 for counts in meta_many["domain_samples"].values())
    # token counts of the train split, accumulated while packing, equal a bincount of its rows
    counts = np.load(os.path.join(many, "token_counts.npy"))
    assert np.array_equal(counts, np.bincount(load_split(one, "train")[0].ravel(), minlength=VOCAB))


@pytest.mark.parametrize("dp_size, dp_rank", [(1, 0), (2, 1)])
def test_same_batches_and_exact_resume_across_shard_boundaries(sharded, dp_size, dp_rank):
    _, one, _, many, _ = sharded
    options = dict(batch_size=3, dp_size=dp_size, dp_rank=dp_rank, seed=5)
    per_epoch = num_batches(many, "train", 3, dp_size)
    reference = take_batches(create_dataset(one, "train", **options), per_epoch + 4)
    streamed = take_batches(create_dataset(many, "train", **options), per_epoch + 4)
    for (ids, domains), (ref_ids, ref_domains) in zip(streamed, reference):
        assert np.array_equal(ids, ref_ids) and np.array_equal(domains, ref_domains)
    for start in (2, per_epoch - 1, per_epoch + 1):  # batches of 3 rows cross 7-row shards; epoch boundary
        resumed = take_batches(create_dataset(many, "train", start_batch=start, **options), 3)
        for (ids, domains), (ref_ids, ref_domains) in zip(resumed, reference[start:start + 3]):
            assert np.array_equal(ids, ref_ids) and np.array_equal(domains, ref_domains)


def test_ranks_side_by_side_equal_the_single_process_batch(sharded):
    _, _, _, many, _ = sharded
    single = take_batches(create_dataset(many, "train", batch_size=4, seed=9), 3)
    ranks = [take_batches(create_dataset(many, "train", batch_size=2, dp_size=2, dp_rank=r, seed=9), 3)
             for r in range(2)]
    for step in range(3):
        assert np.array_equal(np.concatenate([ranks[0][step][0], ranks[1][step][0]]), single[step][0])


def test_shard_written_under_a_temp_name_and_renamed_equals_filewriters_own(tmp_path):
    """write_shard (rows straight to ShardWriter) + rename_shard (the shard count patched into the name
    inside the files) gives the bytes MindRecord's public FileWriter.write_raw_data writes under the final name."""
    from mindspore.mindrecord import FileWriter

    from pangu_sigma.data.shards import HEADER_BYTES, page_bytes, rename_shard, temp_shard_name, write_shard

    rng = np.random.default_rng(3)
    sample_length, count = 9, 5000
    ids = rng.integers(0, 400, size=[count, sample_length]).astype(np.int32)  # [n, S+1]
    domains = rng.integers(0, 3, size=[count]).astype(np.int32)  # [n]
    chunks = [(ids[i:i + 4096], domains[i:i + 4096]) for i in range(0, count, 4096)]
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    final = "train-00002-of-00011.mindrecord"
    reference = FileWriter(str(tmp_path / "theirs" / final), shard_num=1, overwrite=False)
    reference.set_header_size(HEADER_BYTES)
    reference.set_page_size(page_bytes(4 * count * sample_length))
    reference.add_schema({"input_ids": {"type": "int32", "shape": [sample_length]},
                          "domain_id": {"type": "int32"}}, "pangu_sigma_samples")
    for block, block_domains in chunks:
        reference.write_raw_data([{"input_ids": row, "domain_id": d} for row, d in zip(block, block_domains)])
    reference.commit()
    temp = str(tmp_path / "ours" / temp_shard_name("train", 2))
    write_shard(temp, count, sample_length, iter(chunks))
    assert rename_shard(temp, str(tmp_path / "ours" / final))
    assert snapshot(str(tmp_path / "ours")) == snapshot(str(tmp_path / "theirs"))
    assert not rename_shard(str(tmp_path / "ours" / final), str(tmp_path / "ours" / "train-00002-of-123456.mindrecord"))


def test_shards_named_after_encoding_when_the_count_outgrows_the_temp_name(sharded, tmp_path, monkeypatch):
    """A temp name of another length than the final one (a shard count of 6+ digits) cannot be patched:
    the shard is written again under its final name. One worker, in this process, gives the files of
    the two-worker run (shards streamed by the writer process, renamed by the encode workers)."""
    corpus, _, _, many, meta_many = sharded
    monkeypatch.setattr(prepare_module, "temp_shard_name", lambda split, index: f"{split}-{index:05d}-of-t.mindrecord")
    meta = prepare(corpus, str(tmp_path / "out"), vocab_size=VOCAB, seq_length=SEQ, valid_fraction=0.1,
                   progress_every=0, workers=1, shard_bytes=4 * (SEQ + 1) * 7)
    assert meta["splits"] == meta_many["splits"] and len(meta["splits"]["train"]["shards"]) > 3
    ours, theirs = snapshot(str(tmp_path / "out")), snapshot(many)
    del ours["meta.json"], theirs["meta.json"]
    assert ours == theirs


def test_a_file_that_vanishes_while_workers_encode_is_one_line_and_nothing_written(sharded, tmp_path, capsys,
                                                                                  monkeypatch):
    """An encode worker (2 worker processes) cannot read a file the scan listed: exit 2, one line naming
    the file, no output and no temporary folder."""
    corpus = sharded[0]
    real_scan = prepare_module.corpus_module.scan_corpus
    gone = os.path.join(corpus, "code", "vanished.txt")  # domains sorted: code is domain 0

    def scan_then_vanish(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        found.domains[0].files.append(gone)
        found.domains[0].sizes.append(100)
        return found

    monkeypatch.setattr(prepare_module.corpus_module, "scan_corpus", scan_then_vanish)
    output = tmp_path / "out"
    code = prepare_module.main(["--input", corpus, "--output", str(output), "--tokenizer",
                                os.path.join(sharded[1], "tokenizer.model"), "--seq-length", str(SEQ),
                                "--progress-every", "0", "--workers", "2", "--shard-mb", "0.001"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: input={gone!r} is invalid: a file that stays as the scan found it") and \
        "FileNotFoundError" in err, err
    assert os.listdir(tmp_path) == []


def test_encoding_line_aligned_pieces_equals_encoding_the_document(sharded, tmp_path):
    _, one, _, _, _ = sharded
    processor = spm.SentencePieceProcessor(model_file=os.path.join(one, "tokenizer.model"))
    text = "".join(PROSE.values()) + "".join(CODE.values()) + "".join(ZH.values()) + "no newline at the end"
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = [read_piece(str(path), start, end) for start, end in file_pieces(path.stat().st_size, 97)]
    assert "".join(pieces) == text and sum(1 for p in pieces if p) > 10
    assert sum((processor.encode(p) for p in pieces), []) == processor.encode(text)


def test_vocab_4000_on_thousands_of_chinese_characters_trains_or_names_the_fix(tmp_path, capsys):
    """3,000 distinct characters in a small Chinese domain next to a large English one."""
    rng = np.random.default_rng(0)
    hanzi = [chr(0x4E00 + i) for i in range(3000)]
    zh = "".join("".join(rng.choice(hanzi, 40)) + "。\n" for _ in range(400))
    zh += "".join("".join(hanzi[i:i + 30]) + "\n" for i in range(0, 3000, 30))  # every character at least once
    en = "".join(PROSE.values()) * 40
    corpus = write_corpus(tmp_path / "corpus", {"en": {"a.txt": en}, "zh": {"b.txt": zh}})
    code = prepare_module.main(["--input", corpus, "--output", str(tmp_path / "out"), "--vocab-size", "4000",
                                "--seq-length", str(SEQ), "--progress-every", "0", "--workers", "1"])
    err = capsys.readouterr().err
    if code == 0:
        assert read_meta(str(tmp_path / "out"))["vocab_size"] == 4000
    else:
        assert code == 2 and err.count("\n") == 1
        assert "vocab_size=4000 is invalid: at least" in err and "--character-coverage" in err
    # with the coverage lowered the required characters fit in 4,000 pieces
    assert prepare_module.main(["--input", corpus, "--output", str(tmp_path / "low"), "--vocab-size", "4000",
                                "--seq-length", str(SEQ), "--progress-every", "0", "--workers", "1",
                                "--character-coverage", "0.98"]) == 0


def test_too_small_vocabulary_names_the_count_and_the_flags(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", {"en": PROSE, "zh": ZH})
    code = prepare_module.main(["--input", corpus, "--output", str(tmp_path / "out"), "--vocab-size", "270",
                                "--seq-length", str(SEQ), "--progress-every", "0", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    needed = int(err.split("at least ")[1].split()[0])
    assert needed > 270
    assert all(flag in err for flag in ("--vocab-size", "--character-coverage", "--tokenizer-sampling"))


def test_ctrl_c_during_prepare_is_one_line_and_keeps_the_previous_output(sharded, tmp_path, capsys, monkeypatch):
    corpus = sharded[0]
    output = tmp_path / "out"
    output.mkdir()
    (output / "meta.json").write_text('{"old": true}')
    before = snapshot(str(output))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.ShardStream, "finish", interrupted)
    code = prepare_module.main(["--input", corpus, "--output", str(output), "--vocab-size", str(VOCAB),
                                "--seq-length", str(SEQ), "--progress-every", "0", "--workers", "1", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and err.startswith("prepare: interrupted; nothing written")
    assert snapshot(str(output)) == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_ctrl_c_in_a_cli_is_one_line_with_the_note(capsys):
    def body():
        note_for_interrupt("last checkpoint /x/step_10.ckpt (step 10); continue with --resume")
        raise KeyboardInterrupt

    assert run_cli(body) == 130
    assert capsys.readouterr().err == "interrupted: last checkpoint /x/step_10.ckpt (step 10); continue with --resume\n"


# ------------------------------------------------------------------ damaged data


def first_shard(data, split="train"):
    return os.path.join(data, read_meta(data)["splits"][split]["shards"][0]["file"])


def truncate(data):
    path = first_shard(data)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def corrupt(data):
    path = first_shard(data)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def empty(data):
    open(first_shard(data), "wb").close()


def remove_index(data):
    os.remove(first_shard(data) + ".db")


def edit_meta(change):
    def apply(data):
        path = os.path.join(data, "meta.json")
        meta = json.load(open(path))
        change(meta)
        json.dump(meta, open(path, "w"))
    return apply


DAMAGE = [
    ("truncated", truncate, "is truncated to"),
    ("corrupted", corrupt, "sha256 does not match"),
    ("empty", empty, "it is empty"),
    ("missing .db index", remove_index, ".db' is invalid: the MindRecord index"),
    ("vocabulary", edit_meta(lambda m: m.update(vocab_size=m["vocab_size"] + 1)), "vocab_size="),
    ("sample count", edit_meta(lambda m: m.update(train_samples=m["train_samples"] + 1)), "train_samples="),
    # a shard's recorded sha256 edited in meta.json: the shard no longer matches it, and meta.json no longer
    # matches its own digest (meta_sha256); whichever check runs first names the problem
    ("checksum", edit_meta(lambda m: m["splits"]["valid"]["shards"][0].update(sha256="0" * 64)),
     ("sha256 does not match", "no longer matches its meta_sha256")),
]


@pytest.mark.parametrize("name, damage, message", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_damaged_data_is_one_line_before_training_writes_anything(sharded, tmp_path, capsys, name, damage, message):
    from pangu_sigma.training import train as train_module
    from tests.conftest import tiny_run_config

    data = str(tmp_path / "data")
    shutil.copytree(sharded[3], data)
    damage(data)
    config = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(data, str(run_dir), ["model.vocab_size=0"])
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    code = train_module.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    messages = message if isinstance(message, tuple) else (message,)
    assert err.count("\n") == 1 and err.startswith("error: data=") and any(m in err for m in messages), err
    assert not run_dir.exists()
    from pangu_sigma.data.verify import main as verify_main

    assert verify_main([data]) == 2  # the on-demand check (sha256 included) names the same problem
    err = capsys.readouterr().err
    messages = message if isinstance(message, tuple) else (message,)
    assert err.count("\n") == 1 and err.startswith("error: data=") and any(m in err for m in messages), err


def test_start_up_checks_sizes_and_one_rank_hashes(sharded, tmp_path, monkeypatch):
    """Every process checks sizes without reading a shard byte; the sha256 of the shards is read by rank 0
    alone (verify_on_one_rank), whose verdict reaches every rank through the world sum."""
    from pangu_sigma.data import shards
    from pangu_sigma.data.verify import verify_on_one_rank

    data = str(tmp_path / "data")
    shutil.copytree(sharded[3], data)
    corrupt(data)
    hashed = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    read_meta(data)  # sizes only: the corrupted shard passes, nothing but the tokenizer is hashed
    assert [name for name in hashed if "mindrecord" in name] == []
    with pytest.raises(ConfigError, match="rank 0 found one that does not"):
        verify_on_one_rank(data, 1, lambda value: value + 1.0)  # rank 0 (the + 1.0) found the damage
    assert [name for name in hashed if "mindrecord" in name] == []
    verify_on_one_rank(data, 1, lambda value: value)  # nobody failed: rank 1 goes on
    with pytest.raises(ConfigError, match="sha256 does not match"):
        verify_on_one_rank(data, 0, lambda value: value)
    assert os.path.basename(first_shard(data)) in hashed


def test_real_ctrl_c_with_two_workers_stops_in_one_line(sharded, tmp_path):
    """SIGINT to a running prepare (2 worker processes) during encoding: exit 130, one line, the previous
    output unchanged, no temporary folder left."""
    import signal
    import subprocess
    import sys

    from tests.test_data import REPO

    text = "".join(PROSE.values()) + "".join(CODE.values()) + "".join(ZH.values())
    # 160 files: encoding outlasts the parent's reading of the first progress line on a loaded machine (with 40 a
    # run under pytest-xdist finished before the signal landed)
    corpus = write_corpus(tmp_path / "corpus", {"en": {f"{i:03d}.txt": text * 100 for i in range(160)}})
    output = tmp_path / "out"
    output.mkdir()
    (output / "meta.json").write_text('{"old": true}')
    before = snapshot(str(output))
    process = subprocess.Popen(
        [sys.executable, "-m", "pangu_sigma.data.prepare", "--input", corpus, "--output", str(output), "--overwrite",
         "--tokenizer", os.path.join(sharded[1], "tokenizer.model"), "--seq-length", str(SEQ), "--workers", "2",
         "--progress-every", "0.01"], stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    for line in process.stderr:
        if line.startswith("prepare: encode "):
            break
    process.send_signal(signal.SIGINT)
    rest = [line for line in process.stderr.read().splitlines()  # progress lines printed before SIGINT landed
            if not line.startswith(("prepare: encode ", "prepare: write "))]
    assert process.wait(timeout=60) == 130
    assert rest == [f"prepare: interrupted; nothing written, {output} is as it was"], rest
    assert snapshot(str(output)) == before and sorted(os.listdir(tmp_path)) == ["corpus", "out"]


def test_int32_spool_and_list_ids_give_the_files_of_the_uint16_spool_and_array_ids(sharded, tmp_path, monkeypatch):
    """The ids' way to the shards does not change them: an int32 spool (vocabularies over 65,536) and ids
    taken from SentencePiece as a list (SentencePiece without return_type "numpy") give the same files as
    the default uint16 spool with int32-array ids."""
    from pangu_sigma.data import workers as workers_module

    assert workers_module.spool_dtype(VOCAB) == np.uint16 and workers_module.spool_dtype(1 << 16) == np.uint16
    assert workers_module.spool_dtype((1 << 16) + 1) == np.int32
    corpus, one, meta_one, _, _ = sharded
    monkeypatch.setattr(prepare_module, "spool_dtype", lambda vocab_size: np.dtype(np.int32))
    monkeypatch.setattr(workers_module, "returns_numpy", lambda processor: False)
    meta = prepare(corpus, str(tmp_path / "out"), vocab_size=VOCAB, seq_length=SEQ, valid_fraction=0.1,
                   progress_every=0, workers=1)
    assert not workers_module._numpy_ids  # pylint: disable=protected-access
    assert meta["splits"] == meta_one["splits"]
    ours, theirs = snapshot(str(tmp_path / "out")), snapshot(one)
    del ours["meta.json"], theirs["meta.json"]
    assert ours == theirs


def test_a_pool_terminate_that_blocks_is_bounded_and_kills_the_workers():
    """multiprocessing's Pool.terminate can block for ever when an interrupt lands at the wrong moment
    (seen once in 30 randomised Ctrl-C of prepare): workers.Pool.terminate gives up waiting and kills them."""
    import threading
    import time
    from pangu_sigma.data import workers

    pool = workers.Pool(2, workers.init_writer)
    processes = list(pool.pool._pool)
    assert all(p.is_alive() for p in processes)
    real_terminate, blocked = pool.pool.terminate, threading.Event()
    pool.pool.terminate = lambda: blocked.wait(60)  # a terminate that never returns by itself
    started = time.monotonic()
    pool.terminate(wait_s=0.5)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in processes)
    blocked.set()
    real_terminate()
