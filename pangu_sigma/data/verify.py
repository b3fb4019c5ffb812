"""Checksums of a prepared folder, on demand: `python -m pangu_sigma.data.verify DATA`.

prepare records every shard's size and sha256 in meta.json once. Every process of a run checks the
sizes (os.stat, no shard byte read); the sha256 of the whole corpus is checked by this command or, with
data.verify_checksums, by one rank of the run (verify_on_one_rank), never by every process.
"""
import sys

from locmoe.errors import ConfigError, run_cli


def verify_on_one_rank(data_dir, rank, world_sum, enabled=True):
    """Rank 0 hashes every shard against meta.json; every rank learns the verdict through world_sum
    (value -> the sum of every rank's value, one collective all ranks issue), so a damaged shard stops
    every rank with one line instead of leaving the others waiting in the next collective."""
    from pangu_sigma.data.dataset import read_meta

    error = None
    if enabled and rank == 0:
        try:
            read_meta(data_dir, checksums=True)
        except ConfigError as err:
            error = err
    failed = world_sum(1.0 if error is not None else 0.0)
    if error is not None:
        raise error
    if failed:
        raise ConfigError("data", data_dir, "shards whose sha256 matches meta.json: rank 0 found one that does not "
                                            "(its log names it); prepare the data again")


def main(argv=None):
    from locmoe.errors import OneLineArgumentParser
    from pangu_sigma.data.dataset import read_meta

    parser = OneLineArgumentParser(prog="python -m pangu_sigma.data.verify", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="a folder made by python -m pangu_sigma.data.prepare")
    args = parser.parse_args(argv)

    def body():
        meta = read_meta(args.data_dir, checksums=True)
        shards = sum(len(meta["splits"][split]["shards"]) for split in ("train", "valid"))
        print(f"{args.data_dir}: {shards} shards and their indexes match meta.json (sizes and sha256)")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
