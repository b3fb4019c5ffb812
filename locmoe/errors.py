"""One error type for bad user input, printed as a single line by the CLIs."""
import argparse


class ConfigError(ValueError):
    """A field of a config, rank table, data folder or CLI argument is invalid.

    The message always names the field, the bad value, and what is valid.
    """

    def __init__(self, field, value, valid):
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"{field}={value!r} is invalid: {valid}")


_interrupt_note = ["nothing was saved"]


def note_for_interrupt(text):
    """What run_cli says if the user presses Ctrl-C from now on, e.g. where the last checkpoint is."""
    _interrupt_note[0] = text


def keep_ctrl_c_for_python():
    """Re-installs Python's SIGINT handler, so Ctrl-C raises KeyboardInterrupt (then run_cli's one line).

    MindSpore 2.10 replaces it at the first graph launch with mindspore::DefaultIntHandler
    (libmindspore_common.so; found with sigaction + dladdr after a CPU training step), which
    ends the process with SIGTERM and no message. Call after launches; a no-op where Python
    ignores SIGINT (background jobs) or off the main thread.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(action):
    """Run a CLI body; a ConfigError becomes one `error: ...` line on stderr and exit status 2;
    Ctrl-C becomes one `interrupted: <note>` line (note_for_interrupt) and exit status 130."""
    import sys

    note_for_interrupt("nothing was saved")
    try:
        action()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_interrupt_note[0]}", file=sys.stderr)
        return 130
    return 0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
