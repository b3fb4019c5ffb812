"""train.output_dir must be one folder every server sees: rank 0 alone writes run.json and the
checkpoint completion markers, so with node-local folders `--resume` would restart servers 1+ from
step 0 while server 0 resumes (a wrong model, then a hang)."""
import os
import secrets
import time

from locmoe.errors import ConfigError

PROBE_PREFIX = ".shared_folder_check_"
TOKEN_LIMIT = 1 << 24  # the token travels as a float32 sum: exact below 2**24
SEEN_WAIT_S = 10.0  # a network filesystem may show another server's new file after a moment


def _sees(path, token, wait_s):
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read().strip() == str(token):
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_shared_folder(output_dir, rank, world_sum, wait_s=SEEN_WAIT_S):
    """Rank 0 writes a file with a fresh token into output_dir; world_sum (value -> the sum over ranks, one
    collective every rank issues) tells every rank the token; each rank looks for the file, and a second
    world_sum counts the ranks that do not see it: every rank then fails with the same line."""
    token = secrets.randbelow(TOKEN_LIMIT - 1) + 1 if rank == 0 else 0
    if rank == 0:
        path = os.path.join(output_dir, f"{PROBE_PREFIX}{token}")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(str(token))
        os.replace(path + ".tmp", path)
    token = int(world_sum(float(token)))  # rank 0's token; the file exists once every rank got here
    path = os.path.join(output_dir, f"{PROBE_PREFIX}{token}")
    blind = int(world_sum(0.0 if _sees(path, token, wait_s) else 1.0))
    if rank == 0:
        os.remove(path)
    if blind:
        raise ConfigError("train.output_dir", output_dir,
                          f"a folder every server shares (rank 0 writes run.json and the checkpoint markers "
                          f"there): {blind} rank(s) do not see the file rank 0 wrote in it; use a shared "
                          f"filesystem path")
