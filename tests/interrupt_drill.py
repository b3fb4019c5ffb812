"""Randomised interrupts of prepare and train, the way a user meets them (Ctrl-C, kill).

    python tests/interrupt_drill.py [--prepare 30] [--train 10] [--busy 2] [--seed N] [--work DIR]

Each trial starts the command in a session of its own with SIGINT at its default (a background
job of a non-interactive shell inherits it ignored, and Python keeps it so: the drill would test
nothing), sends SIGINT (or SIGTERM for some train trials) to the process at a random moment (once the
package's first line has run: before it, Python's own start-up takes the signal), and
classifies the end: "clean" (the command's one line, exit 130/143, no temp folder, the previous
output intact), "finished" (done before the signal), "trace", "hang" (no exit within the timeout;
the process group is then killed), "stray" (processes of the group outlive it) or "bad" (anything
else). --busy N runs N busy loops beside it (a loaded login node). tests/test_interrupts.py runs
a few trials in CI; this script runs the full drill.
"""
import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE_LINE = "prepare: interrupted; nothing written"
TRAIN_LINE = "interrupted"


def child_env():
    return dict(os.environ, PYTHONPATH=REPO, GLOG_v="3")


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def catches_sigterm(pid):
    """Whether process pid has a handler for SIGTERM (/proc/PID/status SigCgt); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            caught = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return None
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def wait_for_the_command(process, limit=30.0):
    """Until the command's own signal handling has begun: the package's first line (pangu_sigma/__init__)
    catches SIGTERM, which Python's start-up does not. A signal before it meets Python's own start-up
    (a KeyboardInterrupt trace from an import in site or runpy), which no command can change."""
    deadline = time.time() + limit
    while process.poll() is None and catches_sigterm(process.pid) is False and time.time() < deadline:
        time.sleep(0.001)


def run_interrupted(argv, delay, timeout, sig=signal.SIGINT, cwd=REPO):
    """(outcome, exit status, stderr) of argv interrupted by `sig` after `delay` s, and not before the command's
    own signal handling has begun (wait_for_the_command; see the module doc)."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env=child_env(), preexec_fn=default_sigint, start_new_session=True)
    try:
        process.wait(timeout=delay)
        finished_first = True
    except subprocess.TimeoutExpired:
        wait_for_the_command(process)
        finished_first = process.poll() is not None
        if not finished_first:
            process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        return "hang", None, err
    deadline = time.time() + 5
    while group_alive(process.pid) and time.time() < deadline:
        time.sleep(0.05)
    if group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        return "stray", process.returncode, err
    if "Traceback" in err:
        return "trace", process.returncode, err
    if finished_first or process.returncode == 0:
        return "finished", process.returncode, err
    return "interrupted", process.returncode, err


def prepare_argv(corpus, output):
    return [sys.executable, "-m", "pangu_sigma.data.prepare", "--input", corpus, "--output", output,
            "--vocab-size", "2000", "--seq-length", "64", "--overwrite", "--progress-every", "0"]


def make_corpus(work, max_bytes):
    corpus = os.path.join(work, "corpus")
    if not os.path.isdir(corpus):
        subprocess.run([sys.executable, "-m", "pangu_sigma.data.default_corpus", "--output", corpus,
                        "--max-bytes", str(max_bytes)], check=True, env=child_env(), cwd=REPO,
                       stdout=subprocess.DEVNULL)
    return corpus


def prepare_trials(work, count, rng, max_bytes=1_000_000, timeout=30.0):
    """`count` interrupted prepares over one output folder that holds a finished earlier output."""
    corpus = make_corpus(work, max_bytes)
    output = os.path.join(work, "prepared")
    tic = time.time()
    subprocess.run(prepare_argv(corpus, output), check=True, env=child_env(), cwd=REPO,
                   stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    duration = time.time() - tic
    with open(os.path.join(output, "meta.json"), encoding="utf-8") as handle:
        previous = handle.read()
    results = []
    for _ in range(count):
        delay = rng.uniform(0.05, 0.95) * duration
        outcome, code, err = run_interrupted(prepare_argv(corpus, output), delay, timeout)
        lines = [line for line in err.splitlines() if line.strip()]
        left = glob.glob(os.path.join(work, ".prepared.*"))
        if outcome == "interrupted":
            with open(os.path.join(output, "meta.json"), encoding="utf-8") as handle:
                intact = handle.read() == previous
            ok = code == 130 and len(lines) == 1 and lines[0].startswith(PREPARE_LINE) and intact and not left
            outcome = "clean" if ok else "bad"
        elif outcome == "finished" and left:
            outcome = "bad"
        if outcome == "finished":  # a new output of the same input: the same files; the run was shorter
            duration = min(duration, delay)
            with open(os.path.join(output, "meta.json"), encoding="utf-8") as handle:
                previous = handle.read()
        results.append((outcome, round(delay, 2), code, err[-600:] if outcome not in ("clean", "finished") else ""))
        for path in left:  # the next trial starts clean
            subprocess.run(["rm", "-rf", path], check=False)
    return results, duration


def train_config(work, data_dir, overrides=("train.train_steps=100000", "model.seq_length=64",
                                             "checkpoint.save_steps=5", "checkpoint.keep_last=2")):
    """A tiny run's config file in work, training into work/run."""
    import yaml

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import tiny_run_config  # pylint: disable=import-outside-toplevel

    cfg = tiny_run_config(data_dir, os.path.join(work, "run"), list(overrides))
    path = os.path.join(work, "run.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg.to_dict(), handle)
    return path


def train_trials(work, data_dir, count, rng, longest=14.0, timeout=90.0):
    """`count` trainings into fresh run folders, each interrupted by SIGINT or SIGTERM at a random moment."""
    config = train_config(work, data_dir)
    results = []
    for trial in range(count):
        run_dir = os.path.join(work, "run")
        subprocess.run(["rm", "-rf", run_dir], check=False)
        sig = signal.SIGINT if trial % 3 != 2 else signal.SIGTERM
        delay = rng.uniform(0.3, longest)
        outcome, code, err = run_interrupted([sys.executable, "-m", "pangu_sigma.training.train", "--config", config],
                                             delay, timeout, sig)
        lines = [line for line in err.splitlines() if line.strip()]
        temps = [os.path.join(root, name) for root, dirs, files in os.walk(run_dir)
                 for name in files + dirs if "tmp" in name]  # hidden ones too (.tmp<pid>_step_...)
        if outcome == "interrupted":
            # a Ctrl-C taken by one of MindSpore's threads during a graph run reaches Python as the SIGTERM
            # its handler sends (mindspore::DefaultIntHandler): 143 and "(SIGTERM)" for a SIGINT there
            codes = (130, 143) if sig == signal.SIGINT else (143,)
            ok = code in codes and len(lines) == 1 and lines[0].startswith(TRAIN_LINE) and not temps
            if ok and "resume" in lines[0]:  # it names a checkpoint that exists: resume works from it
                ok = os.path.isfile(os.path.join(run_dir, "run.json"))
            if ok and "resume" not in lines[0]:  # no step kept: no folder that looks like a run
                ok = not os.path.exists(os.path.join(run_dir, "run.json"))
            outcome = "clean" if ok else "bad"
        shown = err[-600:] + (f" temporaries left: {temps}" if temps else "")
        results.append((outcome, round(delay, 2), code, shown if outcome != "clean" else lines[0][:200]))
    return results


def busy_loops(count):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def summary(name, results):
    outcomes = {}
    for outcome, *_ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return f"{name}: {len(results)} trials: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", type=int, default=30)
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="size of the prepared corpus")
    args = parser.parse_args()
    import tempfile

    work = args.work or tempfile.mkdtemp(prefix="interrupt_drill_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    loops = busy_loops(args.busy)
    started = time.time()
    try:
        prepared, duration = prepare_trials(work, args.prepare, rng, args.max_bytes)
        print(f"uninterrupted prepare: {duration:.2f} s")
        print(summary("prepare", prepared))
        trained = train_trials(work, os.path.join(work, "prepared"), args.train, rng) if args.train else []
        print(summary("train", trained))
    finally:
        for loop in loops:
            loop.kill()
    for name, results in (("prepare", prepared), ("train", trained)):
        for outcome, delay, code, tail in results:
            if outcome not in ("clean", "finished") or os.environ.get("DRILL_VERBOSE"):
                print(f"  {name} at {delay} s: {outcome}, exit {code}: {tail!r}")
    print(f"total {time.time() - started:.1f} s")
    bad = [r for r in prepared + trained if r[0] not in ("clean", "finished")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
