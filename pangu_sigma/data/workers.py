"""Worker processes of prepare: encode tasks (text pieces -> tokens), shard writes and shard renames.

Workers come from a forkserver (a clean interpreter, safe to fork even when the caller
has MindSpore's threads running) and ignore SIGINT: Ctrl-C is handled by the main
process alone, which then terminates them. Pool.imap keeps at most `window` tasks in
flight and yields results in submission order, so memory is bounded whatever the corpus;
Pool.submit runs one task in the background (the shard writer).
"""
import collections
import multiprocessing
import os
import signal
import threading

import numpy as np

_processor = None  # this worker's SentencePieceProcessor
_numpy_ids = False  # whether it returns ids as an int32 array (return_type="numpy" of recent SentencePiece)


def spool_dtype(vocab_size):
    """Token ids on their way to the shards (encode results, the spool): uint16 when every id fits, else int32.

    The shards always hold int32 (read_spool_rows widens the rows): the dtype changes only the bytes
    moved between processes and through the spool, never the samples.
    """
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def load_processor(model_path):
    """This process's tokenizer. Ids come as an int32 array where SentencePiece can return one: no list of
    Python ints to build and convert (about 10% of the encoding time, measured), else as a list."""
    global _processor, _numpy_ids
    import sentencepiece as spm

    _processor = spm.SentencePieceProcessor(model_file=model_path)
    _numpy_ids = returns_numpy(_processor)


def returns_numpy(processor):
    """Whether processor.encode(text, out_type="numpy") gives the ids as an int32 array."""
    try:
        ids = processor.encode("a", out_type="numpy")
    except (TypeError, ValueError, RuntimeError):  # older SentencePiece: an unknown out_type
        return False
    return isinstance(ids, np.ndarray) and ids.dtype == np.int32


def init_worker(model_path):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if model_path:
        load_processor(model_path)


def init_writer():
    """The shard writer: ignores SIGINT and imports MindSpore's MindRecord writer at once (~1 CPU-s), while
    prepare scans the corpus and trains the tokenizer, rather than while workers encode."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import mindspore.mindrecord  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel


def encode_ids(text):
    """SentencePiece ids of text as an int32 array [T] (the same ids as processor.encode(text))."""
    if _numpy_ids:
        return _processor.encode(text, out_type="numpy")
    return np.array(_processor.encode(text), np.int32)


def encode_task(task):
    """(domain, [(path, start, end, ends_document)], bytes, dtype) -> (domain, tokens [T] of dtype, bytes).

    Each piece is a run of whole lines of a document; EOS follows a document's last piece.
    Encoding a document piece by piece equals encoding it whole: "\\n" is a piece of its
    own that no merge crosses (tests check this). dtype is spool_dtype(vocabulary): every id fits.
    """
    from pangu_sigma.data.corpus import read_piece

    domain, pieces, size, dtype = task
    eos = np.array([_processor.eos_id()], np.int32)
    parts = []
    for path, start, end, ends_document in pieces:
        try:
            text = read_piece(path, start, end)
        except (OSError, UnicodeDecodeError) as error:
            raise InputChanged(path, f"{type(error).__name__}: {error}") from None
        if text:
            parts.append(encode_ids(text))
        if ends_document:
            parts.append(eos)
    # ids lie in [0, vocabulary), which dtype holds: the narrowing cast changes no value
    ids = np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.zeros([0], dtype)  # [T]
    return domain, ids, size


class InputChanged(Exception):
    """A corpus file that passed the scan could not be read or decoded when encoded (changed or removed
    meanwhile); picklable, so it crosses from a worker to prepare, which reports it in one line."""

    def __init__(self, path, reason):
        super().__init__(path, reason)
        self.path, self.reason = path, reason


def read_spool_rows(handle, rows, sample_length, dtype):
    """Rows of the spool file (dtype [N, S+1]) with pread, one read per run of consecutive rows, as int32. # [n, S+1]

    Plain reads, not a memory map: mapped pages of a 1 GB spool would count as this process's memory.
    """
    row_bytes = np.dtype(dtype).itemsize * sample_length
    out = np.empty([len(rows), sample_length], np.int32)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        data = os.pread(handle.fileno(), int(end - start) * row_bytes, int(rows[start]) * row_bytes)
        out[start:end] = np.frombuffer(data, dtype).reshape(-1, sample_length)
    return out


def write_task(task):
    """(path, spool path, rows [n] int64, domain ids [n] int32, sample length, final, spool dtype) -> the shard's meta
    entry if final (its name is the final one), else None (rename_task names it and takes its checksums).

    Rows are read from the spool WRITE_CHUNK at a time, so a shard never sits in memory whole."""
    from pangu_sigma.data.shards import WRITE_CHUNK, shard_entry, write_shard

    path, spool_path, rows, domain_ids, sample_length, final, dtype = task
    with open(spool_path, "rb") as spool:
        chunks = ((read_spool_rows(spool, rows[first:first + WRITE_CHUNK], sample_length, dtype),
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
        if model_path:
            load_processor(model_path)

    def imap(self, function, tasks, window):
        for task in tasks:
            yield function(task)

    def submit(self, function, task):
        return Done(function(task))

    def close(self):
        pass

    def terminate(self):
        pass


TERMINATE_WAIT_S = 5.0  # seconds Pool.terminate may take before its workers are killed


class Pool:
    """multiprocessing pool of `workers` processes with an ordered, bounded imap."""

    def __init__(self, workers, initializer, initargs=()):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["numpy", "sentencepiece", "pangu_sigma.data.workers"])
        self.pool = context.Pool(workers, initializer=initializer, initargs=initargs)

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

    def terminate(self, wait_s=TERMINATE_WAIT_S):
        """Stop the workers; never waits more than about 2 * wait_s. multiprocessing's Pool.terminate can
        block for ever when an interrupt lands while it starts or tears down its handler threads: it runs in a
        daemon thread here, and workers still alive after wait_s are killed (the pool's own list of them)."""
        workers = list(getattr(self.pool, "_pool", []))  # the worker Process objects (CPython's Pool)
        done = threading.Event()

        def stop():
            self.pool.terminate()
            self.pool.join()
            done.set()

        threading.Thread(target=stop, name="pool-terminate", daemon=True).start()
        if not done.wait(wait_s):
            for process in workers:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
            done.wait(wait_s)


def make_pool(workers, model_path):
    """`workers` processes (the caller's own process for 1) that load the tokenizer model_path (None: none)."""
    return InProcess(model_path) if workers == 1 else Pool(workers, init_worker, (model_path,))


def make_writer(workers):
    """The process that writes shards: its own (MindRecord imported at once) with 2+ workers, else this one."""
    return InProcess(None) if workers == 1 else Pool(1, init_writer)


def default_workers():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
