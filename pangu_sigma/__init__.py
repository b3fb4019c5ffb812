"""PanGu-Sigma on MindSpore with the LocMoE router: model, data, training, evaluation and tools."""
import sys

# Commands that end Ctrl-C / SIGTERM in one line (run_cli, prepare): until their main takes over, an
# interrupt during their imports (MindSpore's take seconds) exits at once with that line, not a trace.
# Each of them releases the hold (end_quiet_start) as its main begins its work (tests/test_interrupts.py).
_QUIET_START_COMMANDS = (
    "pangu_sigma.training.train", "pangu_sigma.training.checkpoint_tool",
    "pangu_sigma.evaluation.eval", "pangu_sigma.evaluation.distributed", "pangu_sigma.evaluation.generate",
    "pangu_sigma.data.prepare", "pangu_sigma.data.verify", "pangu_sigma.data.default_corpus",
    "pangu_sigma.data.four_domain_corpus",
    "pangu_sigma.tools.memory_check", "pangu_sigma.tools.bench_fit", "pangu_sigma.tools.bench_init")


def _started_as_quiet_command():
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] in _QUIET_START_COMMANDS


if _started_as_quiet_command():
    from locmoe.errors import exit_quietly_on_interrupt

    exit_quietly_on_interrupt("prepare: interrupted; nothing written" if "pangu_sigma.data.prepare" in sys.orig_argv
                              else "interrupted: nothing was saved")
