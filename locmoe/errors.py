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


def run_cli(action):
    """Run a CLI body; a ConfigError becomes one `error: ...` line on stderr and exit status 2."""
    import sys

    try:
        action()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
