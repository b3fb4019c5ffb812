"""Worker processes of prepare: encode tasks (text pieces -> tokens), shard writes and shard renames.

Workers come from a forkserver (a clean interpreter, safe to fork even when the caller
has MindSpore's threads running) and ignore SIGINT: Ctrl-C is handled by the main
process alone, which then terminates them. Pool.imap keeps at most `window` tasks in
flight and yields results in submission order, so memory is bounded whatever the corpus;
Pool.submit runs one task in the background (the shard writer).
"""
import array
import collections
import multiprocessing
import os
import signal

import numpy as np

_processor = None  # this worker's SentencePieceProcessor


def init_worker(model_path):
    global _processor
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if model_path:
        import sentencepiece as spm

        _processor = spm.SentencePieceProcessor(model_file=model_path)


def encode_task(task):
    """(domain, [(path, start, end, ends_document)], bytes) -> (domain, tokens [T] int32, bytes).

    Each piece is a run of whole lines of a document; EOS follows a document's last piece.
    Encoding a document piece by piece equals encoding it whole: "\\n" is a piece of its
    own that no merge crosses (tests check this).
    """
    from pangu_sigma.data.corpus import read_piece

    domain, pieces, size = task
    eos = _processor.eos_id()
    out = array.array("i")  # C int32: extending it from encode's list is cheaper than numpy's list conversion
    for path, start, end, ends_document in pieces:
        try:
            text = read_piece(path, start, end)
        except (OSError, UnicodeDecodeError) as error:
            raise InputChanged(path, f"{type(error).__name__}: {error}") from None
        if text:
            out.extend(_processor.encode(text))
        if ends_document:
            out.append(eos)
    return domain, np.frombuffer(out, np.int32), size


class InputChanged(Exception):
    """A corpus file that passed the scan could not be read or decoded when encoded (changed or removed
    meanwhile); picklable, so it crosses from a worker to prepare, which reports it in one line."""

    def __init__(self, path, reason):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def read_spool_rows(handle, rows, sample_length):
    """Rows of the spool file (int32 [N, S+1]) with pread, one read per run of consecutive rows. # [n, S+1]

    Plain reads, not a memory map: mapped pages of a 1 GB spool would count as this process's memory.
    """
    row_bytes = 4 * sample_length
    out = np.empty([len(rows), sample_length], np.int32)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        data = os.pread(handle.fileno(), int(end - start) * row_bytes, int(rows[start]) * row_bytes)
        out[start:end] = np.frombuffer(data, np.int32).reshape(-1, sample_length)
    return out


def write_task(task):
    """(path, spool path, rows [n] int64, domain ids [n] int32, sample length, final) -> the shard's meta
    entry if final (its name is the final one), else None (rename_task names it and takes its checksums).

    Rows are read from the spool WRITE_CHUNK at a time, so a shard never sits in memory whole."""
    from pangu_sigma.data.shards import WRITE_CHUNK, shard_entry, write_shard

    path, spool_path, rows, domain_ids, sample_length, final = task
    with open(spool_path, "rb") as spool:
        chunks = ((read_spool_rows(spool, rows[first:first + WRITE_CHUNK], sample_length),
                   domain_ids[first:first + WRITE_CHUNK]) for first in range(0, len(rows), WRITE_CHUNK))
        write_shard(path, len(rows), sample_length, chunks)  # chunks: ([b, S+1], [b])
    return shard_entry(path, len(rows)) if final else None


def rename_task(task):
    """(temp path, final path, rows) -> the meta entry of the shard under its final name, or None when
    the names differ in length (the shard must then be written again under its final name)."""
    from pangu_sigma.data.shards import rename_shard, shard_entry

    temp_path, final_path, num_rows = task
    return shard_entry(final_path, num_rows) if rename_shard(temp_path, final_path) else None


class Done:
    """The result of a task run in this process, with the interface of multiprocessing's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class InProcess:
    """The one-worker case: the same functions, run in this process."""

    def __init__(self, model_path):
        global _processor
        if model_path:
            import sentencepiece as spm

            _processor = spm.SentencePieceProcessor(model_file=model_path)

    def imap(self, function, tasks, window):
        for task in tasks:
            yield function(task)

    def submit(self, function, task):
        return Done(function(task))

    def close(self):
        pass

    def terminate(self):
        pass


class Pool:
    """multiprocessing pool of `workers` processes with an ordered, bounded imap."""

    def __init__(self, workers, model_path):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["numpy", "sentencepiece", "pangu_sigma.data.workers"])
        self.pool = context.Pool(workers, initializer=init_worker, initargs=(model_path,))

    def imap(self, function, tasks, window):
        pending = collections.deque()
        for task in tasks:
            pending.append(self.pool.apply_async(function, (task,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def submit(self, function, task):
        return self.pool.apply_async(function, (task,))

    def close(self):
        self.pool.close()
        self.pool.join()

    def terminate(self):
        self.pool.terminate()
        self.pool.join()


def make_pool(workers, model_path):
    """`workers` processes (the caller's own process for 1) that load the tokenizer model_path (None: none)."""
    return InProcess(model_path) if workers == 1 else Pool(workers, model_path)


def default_workers():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
