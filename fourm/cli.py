"""Command-line plumbing shared by every program in ``data_pipelines/``, ``launch/`` and ``eval/``.

Contract: bad input ends with one line on stderr and exit status 2, never a traceback; an
unexpected failure ends with one line and exit status 1 (the traceback goes to the log at DEBUG).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn, Sequence

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad input from the user: wrong arguments, missing or malformed files. Exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``prog: error: ...``) and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    parse.__name__ = f"{what.replace('-', '_')}_int"
    return parse


positive_int = _int_at_least(1, "positive")  # argparse type: an integer >= 1
non_negative_int = _int_at_least(0, "non-negative")  # argparse type: an integer >= 0


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (not NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` (nothing when path is None)."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr as ``LEVEL name: message``; only rank 0 logs below WARNING under torchrun."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a program's ``main(argv)`` under the exit-status contract and exit."""
    prog = getattr(sys.modules.get(main.__module__), "__file__", None) or main.__module__
    prog = prog.rsplit("/", 1)[-1]
    try:
        status = main(argv)
    except UsageError as exn:
        sys.stderr.write(f"{prog}: error: {exn}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(130)
    except Exception as exn:  # one line for the user, the traceback for whoever debugs
        log.debug("unexpected failure", exc_info=True)
        sys.stderr.write(f"{prog}: failed: {type(exn).__name__}: {exn}\n")
        sys.exit(1)
    sys.exit(int(status or 0))
