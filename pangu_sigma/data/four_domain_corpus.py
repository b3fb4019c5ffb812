"""A four-domain corpus with uneven domain sizes, for placement and router comparisons.

    python -m pangu_sigma.data.four_domain_corpus --output DIR [--max-bytes N] [--overwrite]

Domains (share of --max-bytes): "code" 35% and "en" 35% from the standard library
exactly as the default corpus builds them (sources; docstrings), plus two generated
ones from a fixed seed: "arith" 20% (integer arithmetic lines, `417 * 23 = 9591`) and
"records" 10% (comma-separated event records: date, host, level, latency, status).
The four differ in vocabulary and structure, so a router can tell them apart.
"""
import os
import random
import shutil
import sys

from locmoe.errors import ConfigError, OneLineArgumentParser, note_for_interrupt, run_cli, settle_for_exit
from pangu_sigma.data.default_corpus import build_default_corpus
from pangu_sigma.data.output_folder import built_in_temp

SHARES = {"code": 0.35, "en": 0.35, "arith": 0.2, "records": 0.1}
LINES_PER_FILE = 200
HOSTS = ("alpha", "bravo", "delta", "kilo", "lima", "oscar")
LEVELS = ("INFO", "INFO", "INFO", "WARN", "ERROR")
STATUS = ("ok", "ok", "ok", "retry", "timeout", "refused")


def arith_line(rng):
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {value}"


def record_line(rng):
    return (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.choice(HOSTS)},"
            f"{rng.choice(LEVELS)},{rng.randint(1, 5000)}ms,{rng.choice(STATUS)}")


def generated_files(make_line, budget, seed):
    """(name, text) files of LINES_PER_FILE lines until the UTF-8 budget is used."""
    rng, used, index = random.Random(seed), 0, 0
    while used < budget:
        text = "\n".join(make_line(rng) for _ in range(LINES_PER_FILE)) + "\n"
        text = text.encode("utf-8")[: budget - used].decode("utf-8", errors="ignore")
        yield f"part{index:04d}", text
        used += len(text.encode("utf-8"))
        index += 1


def build_four_domain_corpus(output_dir, max_bytes=2_000_000, overwrite=False, seed=1234, on_commit=None):
    """Writes output_dir/{code,en,arith,records}/*.txt; returns {domain: bytes} (on_commit: built_in_temp's)."""
    if not (isinstance(max_bytes, int) and max_bytes >= 4000):
        raise ConfigError("max_bytes", max_bytes, "an integer >= 4000")
    output_dir = os.path.abspath(output_dir)
    if os.path.lexists(output_dir) and not overwrite:
        raise ConfigError("output", output_dir, "a folder that does not exist yet (pass --overwrite to replace it)")
    with built_in_temp(output_dir, on_commit) as temp_dir:
        stdlib_bytes = int(max_bytes * (SHARES["code"] + SHARES["en"]))
        stdlib_dir = os.path.join(temp_dir, "stdlib")
        build_default_corpus(stdlib_dir, max_bytes=stdlib_bytes)
        # the default corpus splits its budget in halves: code and en 35% each
        for domain in ("code", "en"):
            shutil.move(os.path.join(stdlib_dir, domain), os.path.join(temp_dir, domain))
        os.rmdir(stdlib_dir)
        sizes = {}
        for domain, make_line, offset in (("arith", arith_line, 1), ("records", record_line, 2)):
            os.mkdir(os.path.join(temp_dir, domain))
            total = 0
            for name, text in generated_files(make_line, int(max_bytes * SHARES[domain]), seed + offset):
                with open(os.path.join(temp_dir, domain, name + ".txt"), "w", encoding="utf-8", newline="") as out:
                    out.write(text)
                total += len(text.encode("utf-8"))
            sizes[domain] = total
        for domain in ("code", "en"):
            folder = os.path.join(temp_dir, domain)
            sizes[domain] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return sizes


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.data.four_domain_corpus",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    def body():
        note_for_interrupt(f"nothing written, {os.path.abspath(args.output)} is as it was")
        sizes = build_four_domain_corpus(args.output, args.max_bytes, args.overwrite, on_commit=settle_for_exit)
        print(f"wrote {args.output}: " + ", ".join(f"{d} {b / 1e6:.2f} MB" for d, b in sizes.items()))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
