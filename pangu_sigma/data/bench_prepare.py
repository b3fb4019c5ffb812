"""Benchmark of prepare (not a test): one JSON line per case on stdout.

    flock /work/wt/heavy.lock python -m pangu_sigma.data.bench_prepare --work /tmp/bench_prepare \\
        [--mb 1000] [--small-mb 100] [--workers 1,2] [--vocab-size 8000] [--seq-length 1024] [--old-ref REF]
        [--raw-every 1]

Generates a corpus of about --mb MB from a fixed seed (four domains of unequal size, English
technical text, code, Chinese technical text and Chinese poems over a few thousand distinct
characters), then measures:
  - prepare with each worker count: total MB/s, the encode-pack-write phase's MB/s (input
    MB over the encode + write stages: from the first encode task to the last shard named),
    tokenizer training seconds, peak resident memory (the sum of PSS over prepare's process
    tree, sampled every 1 s; the RSS sum every 0.2 s), the monitor's own CPU-seconds;
  - right after it (the same machine load), SentencePiece's raw encoding speed on the same text
    (every file; --raw-every N: every Nth) with as many processes as prepare has encode workers:
    process i takes files i, i+W, ...; it reads a file, then times processor.encode(text) alone, once
    with ids as a list and once as an int32 array (return_type "numpy", where SentencePiece has it;
    the two in alternating order); time = the slowest process's summed encode time, speed = all
    files' bytes / that time; the reference is the faster of the two return types;
  - today's prepare (prepare.py at --old-ref, run from a temporary copy) and the streaming
    prepare on a --small-mb corpus from the same generator.
Both measurements report the CPU-seconds other processes ran meanwhile (other_load_cpu_s,
raw_other_load_cpu_s: the machine's busy time minus the measured processes'): ~0 on a quiet
machine; a ratio measured with other load is not a figure to quote.
Everything is written under --work and deleted at the end.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOMAINS = {"en_tech": 0.45, "code": 0.25, "zh_tech": 0.2, "zh_poem": 0.1}  # share of the bytes
FILE_BYTES = 64 << 10
SENTENCES = 20000
WORDS = ("the of and to in is for that with on as by this are be from it an or at which can data model "
         "training expert router token layer device node rank memory gradient batch sequence parameter loss "
         "network cluster parallel tensor shape value function return compute update capacity load balance "
         "locality communication bandwidth latency kernel operator graph mode sparse dense attention head "
         "vector matrix embedding vocabulary sample corpus domain shard index file write read stream").split()
CODE_WORDS = ("def return self if else for in range import from class None True False while with as "
              "try except raise lambda yield print len list dict np ms ops x y i j k value result shape").split()


def zipf_choice(rng, count, size, exponent=1.1):
    """Indices in [0, count) with a Zipf-like (rank^-exponent) distribution."""
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return rng.choice(count, size=size, p=weights / weights.sum())


def sentence_pool(domain, rng):
    """SENTENCES sentences in the style of the domain."""
    hanzi = [chr(0x4E00 + i) for i in range(3500)]
    pool = []
    for _ in range(SENTENCES):
        if domain == "en_tech":
            words = [WORDS[i] for i in zipf_choice(rng, len(WORDS), rng.integers(6, 30))]
            text = " ".join(words).capitalize() + (". " if rng.random() < 0.8 else ".\n")
        elif domain == "code":
            words = [CODE_WORDS[i] for i in zipf_choice(rng, len(CODE_WORDS), rng.integers(3, 12))]
            text = " " * int(4 * rng.integers(0, 3)) + " ".join(words) + f"({rng.integers(0, 1000)})\n"
        elif domain == "zh_tech":
            chars = [hanzi[i] for i in zipf_choice(rng, len(hanzi), rng.integers(10, 60))]
            text = "".join(chars) + ("，" if rng.random() < 0.3 else "。") + ("\n" if rng.random() < 0.2 else "")
        else:
            line = rng.choice([5, 7])
            chars = [hanzi[i] for i in zipf_choice(rng, len(hanzi), 2 * line)]
            text = "".join(chars[:line]) + "，" + "".join(chars[line:]) + "。\n"
        pool.append(text)
    return pool


def generate_corpus(root, total_bytes, seed=2024):
    """Writes root/<domain>/NNNNNN.txt files of about FILE_BYTES; returns the bytes written."""
    rng = np.random.default_rng(seed)
    written = 0
    for domain, share in DOMAINS.items():
        pool = sentence_pool(domain, rng)
        encoded = [s.encode("utf-8") for s in pool]
        lengths = np.array([len(e) for e in encoded])
        folder = os.path.join(root, domain)
        os.makedirs(folder)
        budget, number = int(total_bytes * share), 0
        mean = lengths.mean()
        while budget > 0:
            picks = rng.integers(0, SENTENCES, size=int(FILE_BYTES / mean) + 1)
            data = b"".join(encoded[i] for i in picks)
            with open(os.path.join(folder, f"{number:06d}.txt"), "wb") as handle:
                handle.write(data)
            budget -= len(data)
            written += len(data)
            number += 1
    return written


def machine_busy_seconds():
    """CPU-seconds all processes of the machine have run since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """CPU-seconds run on the machine during a span by processes other than the measured ones: the machine's
    busy time minus the measured processes' CPU and this process's own (a quiet machine gives ~0)."""

    def __enter__(self):
        self.busy, self.own = machine_busy_seconds(), time.process_time()
        return self

    def seconds(self, measured_cpu):
        return machine_busy_seconds() - self.busy - (time.process_time() - self.own) - measured_cpu

    def __exit__(self, *exc):
        return False


PSS_EVERY = 5  # PSS on every 5th sample (1 s): it costs ~8 ms of CPU per MindSpore process (a page-table walk)


def run_measured(command, env=None):
    """Runs command; returns (seconds, peak RSS sum MB, peak PSS sum MB of its process tree, stdout, stderr,
    CPU-seconds of other processes meanwhile, CPU-seconds of this monitor).

    RSS counts the shared pages (MindSpore's libraries) once per process; PSS shares them out,
    so the PSS sum is the memory the tree really holds. RSS and the tree's CPU time are sampled every
    0.2 s (the last sample of each process counts), PSS every PSS_EVERY samples: sampled every 0.2 s,
    it took ~7% of a core from the measured pipeline.
    """
    import psutil

    own = time.process_time()
    with OtherLoad() as other:
        started = time.time()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=REPO)
        root = psutil.Process(process.pid)
        peak_rss = peak_pss = 0
        cpu = {}  # pid -> CPU-seconds
        sample = 0
        while process.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                tree = []
            rss = pss = 0
            for member in tree:
                try:
                    rss += member.memory_info().rss
                    if sample % PSS_EVERY == 0:
                        pss += member.memory_full_info().pss
                    times = member.cpu_times()
                    cpu[member.pid] = times.user + times.system
                except psutil.Error:
                    pass
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            sample += 1
            time.sleep(0.2)
        out, err = process.communicate()
        seconds = time.time() - started
        other_cpu = other.seconds(sum(cpu.values()))
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode}): {err[-2000:]}")
    return seconds, peak_rss / 2**20, peak_pss / 2**20, out, err, other_cpu, time.process_time() - own


def corpus_files(root):
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


def raw_encode_worker(args):
    """(model path, files) -> ({return type: summed seconds of its encode calls}, bytes)."""
    model_path, paths = args
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model_path)
    calls = {"list": lambda text: processor.encode(text)}
    try:
        processor.encode("a", out_type="numpy")
        calls["numpy"] = lambda text: processor.encode(text, out_type="numpy")
    except (TypeError, ValueError, RuntimeError):  # a SentencePiece without it
        pass
    seconds = dict.fromkeys(calls, 0.0)
    size = 0
    for number, path in enumerate(paths):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        for name in sorted(calls, reverse=number % 2 == 1):
            tic = time.perf_counter()
            calls[name](text)  # the result is freed inside the timed span
            seconds[name] += time.perf_counter() - tic
        size += len(text.encode("utf-8"))
    return seconds, size, time.process_time()


def raw_encode_speed(model_path, root, workers, every=1):
    """({return type: MB/s}, CPU-seconds of other processes meanwhile) of SentencePiece encode alone on every
    `every`-th file of the corpus, `workers` processes (each times only its encode calls; the slowest one
    sets the time)."""
    files = corpus_files(root)[::every]
    shares = [(model_path, files[i::workers]) for i in range(workers)]
    with OtherLoad() as other:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(raw_encode_worker, shares)
        other_cpu = other.seconds(sum(cpu for _, _, cpu in results))
    size = sum(b for _, b, _ in results) / 1e6
    return {name: size / max(s[name] for s, _, _ in results) for name in results[0][0]}, other_cpu


def emit(case):
    print(json.dumps(case), flush=True)


def prepare_case(name, command, corpus_bytes, env):
    seconds, peak_rss, peak_pss, _, _, other_cpu, monitor_cpu = run_measured(command, env)
    case = {"case": name, "input_mb": round(corpus_bytes / 1e6, 1), "seconds": round(seconds, 1),
            "mb_per_s": round(corpus_bytes / 1e6 / seconds, 2), "peak_pss_mb": round(peak_pss),
            "peak_rss_sum_mb": round(peak_rss), "other_load_cpu_s": round(other_cpu, 1),
            "monitor_cpu_s": round(monitor_cpu, 1)}
    return case


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="scratch folder (deleted at the end)")
    parser.add_argument("--mb", type=float, default=1000)
    parser.add_argument("--small-mb", type=float, default=100, help="0: skip the small-corpus cases")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--old-ref", default="5757499", help="git commit holding today's prepare.py")
    parser.add_argument("--old-file", default=None, help="today's prepare.py as a file (instead of git show)")
    parser.add_argument("--raw-every", type=int, default=1,
                        help="raw SentencePiece speed on every Nth file (1: all the text prepare encodes)")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work)
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    env = dict(os.environ, PYTHONPATH=REPO, GLOG_v="3")
    python = sys.executable
    common = ["--vocab-size", str(args.vocab_size), "--seq-length", str(args.seq_length), "--progress-every", "0"]
    try:
        tic = time.time()
        big = os.path.join(work, "corpus_big")
        big_bytes = generate_corpus(big, int(args.mb * 1e6))
        emit({"case": "generate corpus", "input_mb": round(big_bytes / 1e6, 1), "seconds": round(time.time() - tic, 1)})
        tokenizer = None
        for workers in [int(w) for w in args.workers.split(",")]:
            output = os.path.join(work, f"data_w{workers}")
            command = [python, "-m", "pangu_sigma.data.prepare", "--input", big, "--output", output,
                       "--workers", str(workers)] + common
            case = prepare_case(f"streaming prepare, {workers} worker(s)", command, big_bytes, env)
            with open(os.path.join(output, "meta.json")) as handle:
                meta = json.load(handle)
            timing = meta["timings"]
            phase = timing["encode_pack"] + timing["write"]
            tokenizer = tokenizer or os.path.join(work, "tokenizer.model")
            if not os.path.exists(tokenizer):
                shutil.copyfile(os.path.join(output, "tokenizer.model"), tokenizer)
            raw, raw_other_cpu = raw_encode_speed(tokenizer, big, workers, args.raw_every)
            raw_mb_s = max(raw.values())  # the faster return type: the stronger reference
            shards = sum(len(entry["shards"]) for entry in meta["splits"].values())
            case.update({"scan_s": timing["scan"], "tokenizer_train_s": timing["tokenizer"],
                         "encode_pack_s": timing["encode_pack"], "write_s": timing["write"],
                         "encode_pack_write_mb_per_s": round(big_bytes / 1e6 / phase, 2),
                         "raw_sentencepiece_mb_per_s": round(raw_mb_s, 2),
                         **{f"raw_{name}_mb_per_s": round(speed, 2) for name, speed in raw.items()},
                         "raw_every": args.raw_every, "raw_other_load_cpu_s": round(raw_other_cpu, 1),
                         "phase_vs_raw": round(big_bytes / 1e6 / phase / raw_mb_s, 3),
                         "samples": meta["train_samples"] + meta["valid_samples"], "shards": shards})
            emit(case)
            shutil.rmtree(output)
        if not args.small_mb:
            return
        small = os.path.join(work, "corpus_small")
        small_bytes = generate_corpus(small, int(args.small_mb * 1e6))
        old_dir = os.path.join(work, "old", "pangu_sigma", "data")
        os.makedirs(old_dir)
        if args.old_file:
            with open(args.old_file) as handle:
                old_source = handle.read()
        else:
            old_source = subprocess.run(["git", "show", f"{args.old_ref}:pangu_sigma/data/prepare.py"], cwd=REPO,
                                        capture_output=True, text=True, check=True).stdout
        with open(os.path.join(old_dir, "prepare_today.py"), "w") as handle:
            handle.write(old_source)
        old_command = [python, os.path.join(old_dir, "prepare_today.py"), "--input", small, "--output",
                       os.path.join(work, "data_old"), "--vocab-size", str(args.vocab_size), "--seq-length",
                       str(args.seq_length), "--progress-every", "0"]
        emit(prepare_case(f"today's prepare ({args.old_ref})", old_command, small_bytes, env))
        for workers in [int(w) for w in args.workers.split(",")]:
            command = [python, "-m", "pangu_sigma.data.prepare", "--input", small, "--output",
                       os.path.join(work, f"data_small_w{workers}"), "--workers", str(workers)] + common
            emit(prepare_case(f"streaming prepare, small corpus, {workers} worker(s)", command, small_bytes, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
