"""The one error frame of every command line in this project (``mxref``, ``mxverify``, ``dmx``).

A command's body runs inside :func:`run_cli`, which turns what can go wrong into the
exit codes of docs/failures.md, the same way for every tool:

* the body returns: its return value (``None`` -> 0);
* bad input -- :class:`mxref.MXError` (dmx's ``DMXError`` is one) or a class the tool
  names in ``bad_input`` -- exit 2, ``prog: error: <message on one line>`` on stderr;
* any other OSError (disk full, permission denied while writing): exit 1, same line;
* stdout closed early (``... | head``): exit 1, nothing printed;
* Ctrl-C (KeyboardInterrupt): exit 130, ``prog: interrupted`` (+ ``interrupt_note``).

A broken pipe exits 1 quietly, the convention of the Python documentation's note on
SIGPIPE (signal module), of click and of pip: the output was cut short, so it is not a
success, but it is not an error worth a message either. Stdout is pointed at /dev/null
first so that the interpreter's final flush does not print a second BrokenPipeError.
130 is the shell's 128 + SIGINT. A traceback means a bug in the tool, never bad input.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mxref.errors import MXError

EXIT_OK = 0
EXIT_FAILED = 1        # ran and found a problem (DUT mismatch, failed sweep), an OS error
EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 1   # stdout closed by the reader; quiet
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def one_line(err: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one
    space); the class name when the message is empty."""
    return " ".join(str(err).split()) or type(err).__name__


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout is not a real file (tests)
        pass


def run_cli(prog: str, body: Callable[[], int | None], *,
            bad_input: tuple[type[BaseException], ...] = (),
            interrupt_note: str = "") -> int:
    """Run ``body()`` and return the process exit code (see the module's table).

    ``prog`` prefixes every message (``"mxref"``, ``"mxverify check"``, ``"dmx"``);
    ``bad_input`` adds exception classes that mean bad input (exit 2) besides MXError,
    e.g. ``(OSError, json.JSONDecodeError)`` for a tool whose inputs are mostly files;
    ``interrupt_note`` follows ``prog: interrupted`` (e.g. ``"; nothing half-written was
    left behind"``). Use it as ``sys.exit(run_cli("tool", lambda: cmd(args)))``.
    """
    try:
        rc = body()
        sys.stdout.flush()   # a closed pipe shows here, inside the frame, not at exit
        return EXIT_OK if rc is None else int(rc)
    except BrokenPipeError:   # an OSError: before the OSError clauses
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupt_note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MXError, *bad_input) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
