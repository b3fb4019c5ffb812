"""Sharded MindRecord files of a prepared split, and the checks that they are what meta.json says.

A split is a list of MindRecord files `{split}-{i:05d}-of-{K:05d}.mindrecord` (each with its
own `.db` index written by MindRecord), rows input_ids int32 [S+1] and domain_id int32, in
split order: shard i holds rows [sum of earlier shard sizes, + its size). meta.json lists per
shard its sample count and the size and sha256 of both files; `{split}_domain_ids.npy`
(int32 [N]) holds every row's domain id so placement code need not read the token rows.
"""
import os

import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.data.tokenizer import file_sha256

FORMAT_VERSION = 2
HEADER_BYTES = 1 << 17  # MindRecord's defaults (16 MB header, 32 MB pages) make a tiny shard 48 MB
MAX_PAGES = 256  # a 128 KB header holds the metadata of this many pages with room to spare
WRITE_CHUNK = 4096
DEFAULT_SHARD_BYTES = 256 << 20


def shard_name(split, index, count):
    return f"{split}-{index:05d}-of-{count:05d}.mindrecord"


def domain_ids_name(split):
    return f"{split}_domain_ids.npy"


def page_bytes(data_bytes):
    """The smallest power-of-two MindRecord page (32 KB .. 256 MB) that keeps the page count <= MAX_PAGES."""
    size = 1 << 15
    while size * MAX_PAGES < data_bytes and size < (1 << 28):
        size <<= 1
    return size


def rows_per_shard(sample_length, shard_bytes):
    """Rows of every shard of a split but its last: as many as fit in shard_bytes of tokens (at least 1)."""
    return max(1, shard_bytes // (4 * sample_length))


def shard_rows(num_rows, sample_length, shard_bytes):
    """[(first, end)] row ranges of the shards of a split: at most shard_bytes of tokens each (none if empty)."""
    per_shard = rows_per_shard(sample_length, shard_bytes)
    return [(start, min(num_rows, start + per_shard)) for start in range(0, num_rows, per_shard)]


def temp_shard_name(split, index):
    """The name shard `index` is written under before the split's shard count is known: the final
    name's length while the count has 5 digits, so the name inside the files can be patched in place."""
    return f"{split}-{index:05d}-of-xxxxx.mindrecord"


def write_shard(path, num_rows, sample_length, chunks):
    """One MindRecord file (+ its .db index) of num_rows rows from chunks of
    (input_ids [b, S+1] int32, domain_ids [b] int32).

    FileWriter sets up the file (schema, header and page size); the rows then go straight to its
    ShardWriter with the arguments FileWriter.write_raw_data would pass after its per-row Python
    checks (mindspore/mindrecord/filewriter.py write_raw_data -> core/shardwriter.py write_raw_data:
    blob = bytes(ndarray) for the one blob field, raw = {0: [{"domain_id": int}]}): the same bytes on
    disk (tests compare with FileWriter.write_raw_data) at about two thirds of the time. The C++
    schema check is off (validate=False): the rows are built here with the schema's exact types.
    """
    from mindspore import _c_mindrecord
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(path, shard_num=1, overwrite=False)
    writer.set_header_size(HEADER_BYTES)
    writer.set_page_size(page_bytes(4 * num_rows * sample_length))
    writer.add_schema({"input_ids": {"type": "int32", "shape": [sample_length]},
                       "domain_id": {"type": "int32"}}, "pangu_sigma_samples")
    shard_writer = writer._writer  # pylint: disable=protected-access
    if not shard_writer.is_open:  # what FileWriter.write_raw_data does on its first call
        shard_writer.open(writer._paths, writer._overwrite)  # pylint: disable=protected-access
    if not shard_writer.get_shard_header():
        shard_writer.set_shard_header(writer._header)  # pylint: disable=protected-access
    written = 0
    for input_ids, domain_ids in chunks:
        input_ids = np.ascontiguousarray(input_ids, np.int32)  # [b, S+1]
        assert input_ids.shape == (len(domain_ids), sample_length), (input_ids.shape, len(domain_ids))
        status = shard_writer._writer.write_raw_data(  # pylint: disable=protected-access
            {0: [{"domain_id": int(domain)} for domain in domain_ids]}, [row.tobytes() for row in input_ids],
            False, False)
        if status != _c_mindrecord.MSRStatus.SUCCESS:
            raise RuntimeError(f"{path}: MindRecord could not write {len(input_ids)} rows")
        written += len(input_ids)
    writer.commit()
    assert written == num_rows, (written, num_rows)


def shard_entry(path, num_rows):
    """The meta.json entry of a written shard: sample count, sizes and sha256 of the file and its index."""
    return {"file": os.path.basename(path), "samples": int(num_rows),
            "bytes": os.path.getsize(path), "sha256": file_sha256(path),
            "db_bytes": os.path.getsize(path + ".db"), "db_sha256": file_sha256(path + ".db")}


def rename_shard(temp_path, final_path):
    """Renames a shard written under temp_shard_name (and its .db) to final_path, patching the file name
    MindRecord stores in both files (the header's shard_addresses, the index's SHARD_NAME row): exactly
    one occurrence in each, replaced by a name of the same length, so the files equal those written under
    final_path. Returns False (nothing changed) when the names differ in length."""
    old, new = os.path.basename(temp_path).encode(), os.path.basename(final_path).encode()
    if len(old) != len(new):
        return False
    for suffix, limit in (("", HEADER_BYTES), (".db", None)):
        with open(temp_path + suffix, "r+b") as handle:
            data = handle.read(limit) if limit else handle.read()
            where = data.find(old)
            if where < 0 or data.find(old, where + 1) >= 0:
                raise RuntimeError(f"{temp_path + suffix}: expected its file name once, found it "
                                   f"{data.count(old)} times (MindRecord format changed?)")
            handle.seek(where)
            handle.write(new)
    os.rename(temp_path + ".db", final_path + ".db")
    os.rename(temp_path, final_path)
    return True


# ------------------------------------------------------------------ checks

_checksums = {}  # (path, size, mtime_ns) -> sha256: each file is hashed once per process


def cached_sha256(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checksums:
        _checksums[key] = file_sha256(path)
    return _checksums[key]


def damaged(path, what):
    return ConfigError("data", path, f"{what}; prepare the data again (python -m pangu_sigma.data.prepare)")


def check_file(path, size, sha256, role, checksums=True):
    """None when path has `size` bytes (and, with checksums, the sha256 prepare recorded), else the error."""
    if not os.path.isfile(path):
        return damaged(path, f"the {role} listed in meta.json, which is missing")
    actual = os.path.getsize(path)
    if actual == 0 and size:
        return damaged(path, f"the {role} of {size} bytes meta.json lists; it is empty")
    if actual < size:
        return damaged(path, f"the {role} of {size} bytes meta.json lists; it is truncated to {actual} bytes")
    if actual != size:
        return damaged(path, f"the {role} of {size} bytes meta.json lists; it has {actual} bytes")
    if checksums and cached_sha256(path) != sha256:
        return damaged(path, f"the {role} meta.json lists; its sha256 does not match (corrupted or replaced)")
    return None


def verify_split(data_dir, meta, split, checksums=True):
    """Raises a one-line ConfigError naming the file when a shard is missing, truncated, its sample count
    disagrees with meta.json or (checksums) its sha256 is not the one prepare recorded. Without checksums
    only sizes are read (os.stat): no shard byte is read, whatever the corpus size."""
    entry = meta["splits"][split]
    shards = entry["shards"]
    total = sum(shard["samples"] for shard in shards)
    if total != meta[f"{split}_samples"]:
        raise ConfigError("data", os.path.join(data_dir, "meta.json"),
                          f"{split}_samples={meta[f'{split}_samples']} equal to the sum of its shards' samples "
                          f"({total}); meta.json does not match the files")
    for shard in shards:
        path = os.path.join(data_dir, shard["file"])
        error = (check_file(path, shard["bytes"], shard["sha256"], f"{split} shard", checksums)
                 or check_file(path + ".db", shard["db_bytes"], shard["db_sha256"],
                               f"MindRecord index of {shard['file']}", checksums))
        if error:
            raise error
    ids_path = os.path.join(data_dir, entry["domain_ids"])
    if not os.path.isfile(ids_path):
        raise damaged(ids_path, "the domain-id file listed in meta.json, which is missing")
    try:
        domain_ids = np.load(ids_path, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise damaged(ids_path, f"a .npy file of domain ids ({error})") from None
    if domain_ids.shape != (total,):
        raise damaged(ids_path, f"{total} domain ids as meta.json says; it holds shape {domain_ids.shape}")


def verify_vocabulary(data_dir, meta):
    """tokenizer.model and token_counts.npy must be those meta.json describes."""
    import sentencepiece as spm

    tokenizer = os.path.join(data_dir, meta["tokenizer"])
    error = check_file(tokenizer, os.path.getsize(tokenizer) if os.path.isfile(tokenizer) else 0,
                       meta["tokenizer_sha256"], "tokenizer")
    if error:
        raise error
    size = spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()
    if size != meta["vocab_size"]:
        raise ConfigError("data", os.path.join(data_dir, "meta.json"),
                          f"vocab_size={meta['vocab_size']} equal to the vocabulary of {meta['tokenizer']} "
                          f"({size}); meta.json does not match the files")
    counts_path = os.path.join(data_dir, meta["token_counts"])
    try:
        counts = np.load(counts_path, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise damaged(counts_path, f"a .npy file of token counts ({error})") from None
    if counts.shape != (meta["vocab_size"],):
        raise ConfigError("data", os.path.join(data_dir, "meta.json"),
                          f"vocab_size={meta['vocab_size']} equal to the length of {meta['token_counts']} "
                          f"({counts.shape}); meta.json does not match the files")


def meta_digest(meta):
    """sha256 of meta.json's content without its own "meta_sha256" field (keys sorted): prepare stores it
    there, read_meta recomputes it, so an edited meta.json is caught like an edited shard."""
    import hashlib
    import json

    content = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()
