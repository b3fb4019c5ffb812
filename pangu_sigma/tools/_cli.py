"""Small shared pieces of the tools' command lines: one-line argument errors (the JSON writer lives in pangu_sigma.json_io)."""
import argparse
import sys

from pangu_sigma.json_io import dumps, write_json  # noqa: F401 (re-exported for the tools)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a single `error: ...` line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def fail(message, code=2):
    """Print `error: message` on stderr and return the exit status (for `return fail(...)` in main)."""
    print(f"error: {message}", file=sys.stderr)
    return code
