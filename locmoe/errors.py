"""One error type for bad user input, printed as a single line by the CLIs."""
import argparse
import contextlib


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


@contextlib.contextmanager
def ctrl_c_deferred(swallow=False):
    """Holds Ctrl-C and SIGTERM for the body: process starts, graph runs and clean-ups are never cut in half.

    The signals are blocked in this thread and recorded if another thread takes them; as the body
    ends they raise KeyboardInterrupt (Terminated for SIGTERM alone), or with swallow=True they are
    consumed and the yielded list is non-empty (the caller says what the late signal found).
    Processes started inside inherit the blocked mask (fork and exec keep it), so pool workers and
    their forkserver never see a Ctrl-C meant for this process. Python's SIGINT handler is put back at
    the end even if MindSpore replaced it meanwhile: MindSpore 2.10 installs mindspore::DefaultIntHandler
    (libmindspore_common.so; found with sigaction + dladdr after a CPU training step) at the first graph
    launch, which ends the process with SIGTERM and no message. Where SIGINT is ignored (a background
    job) it stays ignored. A no-op off the main thread, where Python runs no signal handler.
    """
    import signal
    import threading

    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    held = tuple(sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN)
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in held}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield caught
    finally:
        while (info := signal.sigtimedwait(held, 0)) is not None:  # pending for this process: consumed
            caught.append(info.si_signo)
        for sig, handler in previous.items():  # None: a handler not set from Python (MindSpore's)
            if signal.getsignal(sig) is not signal.SIG_IGN:  # SIG_IGN: settle_for_exit ran in the body
                signal.signal(sig, handler if handler is not None else _PYTHON_HANDLERS[sig])
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if caught and not swallow:
            raise KeyboardInterrupt() if signal.SIGINT in caught else Terminated()


def exit_quietly_on_interrupt(line="interrupted: nothing was saved"):
    """A command's start-up (its imports): Ctrl-C or SIGTERM is held until end_quiet_start (run_cli,
    prepare's main), which then ends the process with one line (nothing is written yet), instead of a
    KeyboardInterrupt trace from inside an import (or a subprocess an import runs losing its parent).
    A second signal meanwhile ends the process at once."""
    import os
    import signal

    def hold(signum, _):
        if _quiet_start[1:]:
            os.write(2, f"{line}\n".encode())
            os._exit(128 + signum)
        _quiet_start.append(signum)

    _quiet_start[:] = [(hold, line)]
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, hold)


_quiet_start = []  # [(the handler exit_quietly_on_interrupt installed, its line), signals held...]


def settle_for_exit():
    """The command's outcome is decided (its output complete, or its one line due): Ctrl-C and SIGTERM are
    ignored from now until the process exits. Python's exit runs multiprocessing's finalizers, where a
    KeyboardInterrupt prints a trace, and then puts SIGINT back to its default action, which would end the
    process by the signal with no line although its output is complete. kill -9 still ends it. Only in a
    process started as one of the project's commands (`python -m pangu_sigma...` or `-m locmoe...`): a caller
    of main(), such as a test, keeps its handlers. Main thread only."""
    import signal
    import sys
    import threading

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    command = spec is not None and spec.name.split(".")[0] in ("pangu_sigma", "locmoe")
    if command and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def end_quiet_start():
    """Python's own SIGINT / SIGTERM handling again where exit_quietly_on_interrupt set its handler;
    a signal it held ends the process now, with its line."""
    import signal
    import sys

    if not _quiet_start:
        return
    (handler, line), held = _quiet_start[0], _quiet_start[1:]
    for sig, python_handler in _python_handlers().items():
        if signal.getsignal(sig) is handler:
            signal.signal(sig, python_handler)
    _quiet_start.clear()
    if held:
        print(line, file=sys.stderr)
        raise SystemExit(128 + held[0])


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler) raised like Ctrl-C, so the same clean-ups run."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _python_handlers():
    import signal

    return {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


_PYTHON_HANDLERS = _python_handlers()


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated in the body (main thread only; elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # SIG_IGN: settle_for_exit ran in the body
            signal.signal(signal.SIGTERM, before)


def run_cli(action):
    """Run a CLI body; a ConfigError becomes one `error: ...` line on stderr and exit status 2;
    Ctrl-C (SIGTERM) becomes one `interrupted: <note>` line (note_for_interrupt), exit status 130 (143).
    Once the outcome is decided, the process reports and exits without interruption (settle_for_exit)."""
    import sys

    note_for_interrupt("nothing was saved")
    try:
        with sigterm_raises():
            end_quiet_start()  # in the body: SIGTERM goes from the start-up's hold to Terminated, never the default
            action()
            settle_for_exit()
    except ConfigError as err:
        settle_for_exit()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        settle_for_exit()
        terminated = isinstance(interrupt, Terminated)
        print(f"interrupted{' (SIGTERM)' if terminated else ''}: {_interrupt_note[0]}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
