"""Corpus folder -> domains, files and line-aligned pieces, read in bounded chunks.

A domain is a subfolder of the corpus (sorted names; a flat folder is the one domain
"default"); every non-hidden file below it (recursively, sorted by path parts) is one
document. Files are read in chunks of at most READ_BYTES, so memory does not grow with
the size of a file or of the corpus.
"""
import codecs
import os
from dataclasses import dataclass, field

from locmoe.errors import ConfigError

READ_BYTES = 1 << 20  # bytes per read while scanning
TASK_BYTES = 1 << 20  # text per encode task (a task never mixes domains)


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


@dataclass
class Domain:
    name: str
    files: list = field(default_factory=list)   # UTF-8 files, in document order
    sizes: list = field(default_factory=list)   # their sizes in bytes
    chars: int = 0                               # characters of all its files

    @property
    def bytes(self):
        return sum(self.sizes)


@dataclass
class Corpus:
    root: str
    domains: list        # [Domain]
    skipped: list        # relative paths of files that are not UTF-8
    file_count: int

    @property
    def bytes(self):
        return sum(domain.bytes for domain in self.domains)


def utf8_chars(path, size):
    """Characters of a UTF-8 file, or None if it is not UTF-8; reads READ_BYTES at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    chars = 0
    with open(path, "rb") as handle:
        try:
            while True:
                block = handle.read(READ_BYTES)
                if not block:
                    chars += len(decoder.decode(b"", final=True))
                    return chars
                chars += len(decoder.decode(block))
        except UnicodeDecodeError:
            return None


def scan_corpus(input_dir, progress=None):
    """Corpus: domains with their UTF-8 files (sizes, characters); non-UTF-8 files are listed as skipped.

    progress(bytes_read) is called after every file.
    """
    domain_dirs = find_domains(input_dir)
    domains, skipped, total = [], [], 0
    for name, folder in domain_dirs:
        domain = Domain(name)
        for path in list_files(folder):
            total += 1
            size = os.path.getsize(path)
            chars = utf8_chars(path, size)
            if chars is None:
                skipped.append(os.path.relpath(path, input_dir))
            elif size:
                domain.files.append(path)
                domain.sizes.append(size)
                domain.chars += chars
            if progress:
                progress(size)
        domains.append(domain)
    if total == 0:
        raise ConfigError("input", input_dir, "a folder with text files; it holds no files")
    if not any(domain.files for domain in domains):
        raise ConfigError("input", input_dir,
                          f"at least one non-empty UTF-8 text file; found none ({len(skipped)} of "
                          f"{total} files skipped as not UTF-8)")
    return Corpus(input_dir, domains, skipped, total)


def read_piece(path, start, end):
    """Text of the lines of path whose first byte lies in [start, end) (a line ends after its b"\\n").

    Consecutive pieces [0, a), [a, b), ... [z, size) partition the file into whole lines.
    """
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the line holding byte start-1 belongs to the previous piece
        begin = handle.tell()
        data = bytearray()
        if begin < end:
            data += handle.read(end - begin)
            if not data.endswith(b"\n"):
                data += handle.readline()  # finish the line that starts before end
    return data.decode("utf-8")


def file_pieces(size, piece_bytes=TASK_BYTES):
    """[(start, end)] byte ranges of at most piece_bytes covering [0, size)."""
    return [(start, min(size, start + piece_bytes)) for start in range(0, size, piece_bytes)] or [(0, 0)]


def encode_tasks(domain_index, domain, task_bytes=TASK_BYTES):
    """Tasks of one domain, in document order: [(domain_index, [(path, start, end, ends_document)], bytes)].

    Small files are grouped up to task_bytes; large files are cut into line-aligned pieces.
    """
    pieces, used = [], 0
    for path, size in zip(domain.files, domain.sizes):
        ranges = file_pieces(size, task_bytes)
        for number, (start, end) in enumerate(ranges):
            if pieces and used + (end - start) > task_bytes:
                yield domain_index, pieces, used
                pieces, used = [], 0
            pieces.append((path, start, end, number == len(ranges) - 1))
            used += end - start
    if pieces:
        yield domain_index, pieces, used
