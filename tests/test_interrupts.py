"""Issue 20 item 1: prepare and train interrupted at random moments (SIGINT, some trains SIGTERM) end in
one line, never hang, never trace, leave no temporary folder and the earlier output intact.

CI runs a few trials on a small corpus; INTERRUPT_DRILL=full runs the full drill (30 prepares, 10
trainings, as `python tests/interrupt_drill.py`, which also keeps the machine busy)."""
import os
import random
import subprocess
import sys

from interrupt_drill import REPO, make_corpus, prepare_trials, train_config, train_trials

FULL = os.environ.get("INTERRUPT_DRILL") == "full"


def test_prepare_and_train_interrupted_at_random_moments(tmp_path):
    rng = random.Random(20)
    prepared, _ = prepare_trials(str(tmp_path), 30 if FULL else 5, rng, max_bytes=1_000_000 if FULL else 100_000)
    trained = train_trials(str(tmp_path), str(tmp_path / "prepared"), 10 if FULL else 2, rng,
                           longest=14.0 if FULL else 10.0)
    failed = [trial for trial in prepared + trained if trial[0] not in ("clean", "finished")]
    assert not failed, failed
    assert sum(outcome == "clean" for outcome, *_ in prepared) >= len(prepared) // 3, prepared  # many interrupted


SIGNALS_AT_EXIT = '''import atexit, os, signal, time


def interrupt_the_exit():  # registered first, so it runs after every other exit handler (multiprocessing's)
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(os.getpid(), sig)
        time.sleep(0.2)


atexit.register(interrupt_the_exit)
'''


def run_with_signals_at_exit(tmp_path, module, *args):
    """(exit status, stderr lines, stdout) of `python -m module args` that gets Ctrl-C and SIGTERM as it exits
    (run from tmp_path: `-m` puts the working folder first on sys.path)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SIGNALS_AT_EXIT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{REPO}", GLOG_v="3")
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120, check=False)
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()], done.stdout


def test_a_signal_as_a_finished_command_exits_changes_nothing(tmp_path):
    """Once a command's outcome is decided it reports and exits: a Ctrl-C or SIGTERM in Python's exit (where
    multiprocessing's finalizers run, then SIGINT's default action is back) neither traces nor ends it by the
    signal, and its exit status and line stay those of its outcome."""
    corpus = make_corpus(str(tmp_path), 30_000)
    output = tmp_path / "prepared"
    code, lines, out = run_with_signals_at_exit(tmp_path, "pangu_sigma.data.prepare", "--input", corpus, "--output",
                                                str(output), "--vocab-size", "600", "--seq-length", "32",
                                                "--progress-every", "0")
    assert (code, lines) == (0, []) and out.startswith(f"wrote {output}"), (code, lines, out)
    code, lines, out = run_with_signals_at_exit(tmp_path, "pangu_sigma.data.verify", str(output))
    assert code == 0 and not lines, (code, lines, out)
    config = train_config(str(tmp_path), str(output), ["train.train_steps=5", "model.seq_length=32",
                                                       "checkpoint.save_steps=5"])
    code, lines, out = run_with_signals_at_exit(tmp_path, "pangu_sigma.training.train", "--config", config)
    assert code == 0 and not lines and "[train] done: 5 steps" in out, (code, lines, out[-600:])
    code, lines, _ = run_with_signals_at_exit(tmp_path, "pangu_sigma.evaluation.eval", "--config",
                                              str(tmp_path / "missing.yaml"), "--checkpoint", str(tmp_path))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --config="), (code, lines)


def test_the_quiet_start_commands_are_those_that_end_it():
    """pangu_sigma/__init__ holds Ctrl-C and SIGTERM during the imports of the commands it lists, until their main
    calls end_quiet_start (run_cli does): a listed command that never calls it would hold them for ever, and a
    command that calls it unlisted meets a Ctrl-C in its imports with a KeyboardInterrupt trace."""
    import glob

    import pangu_sigma

    listed = set(pangu_sigma._QUIET_START_COMMANDS)  # pylint: disable=protected-access
    sources = {}
    for path in glob.glob(os.path.join(REPO, "pangu_sigma", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if 'if __name__ == "__main__":' in text:
            sources[os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")] = text
    ends_it = {name for name, text in sources.items() if "run_cli(" in text or "end_quiet_start()" in text}
    ends_it |= {name for name, text in sources.items()  # a command whose main is another listed command's main
                if any(f"from {other} import main" in text for other in ends_it)}
    assert listed <= set(sources), listed - set(sources)
    assert listed == ends_it, {"listed, never ending the hold": listed - ends_it, "unlisted": ends_it - listed}
