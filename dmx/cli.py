"""The ``dmx`` command line: search, combine, eval, baseline, report, export, demo.

Every bad input ends as one line ``dmx: error: <what is wrong and what to do>`` on stderr
with exit code 2 and no traceback; Ctrl-C exits 130 with a message. The subcommands'
modules are imported only to build their parsers (torch/transformers load when a
command runs), so ``dmx --help`` is quick.
"""
from __future__ import annotations

import argparse
import sys

from mxref.cliframe import EXIT_BAD_INPUT, run_cli

from dmx.errors import DMXError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become a DMXError (one line, exit 2)."""

    def error(self, message):
        raise DMXError(f"{message} (see `{self.prog} --help`)")


def _unavailable(name: str, err: Exception):
    """A stand-in subcommand when its module fails to import: says so when used."""
    def run(args):
        raise DMXError(f"`dmx {name}` is not available in this build ({type(err).__name__}: "
                       f"{err}); reinstall dmx")
    return run


def _add_optional(sub, name: str, module: str, adder: str, runner: str | None, help_: str):
    import importlib
    try:
        mod = importlib.import_module(module)
        p = getattr(mod, adder)(sub)
        if runner is not None:
            p.set_defaults(func=getattr(mod, runner))
    except ImportError as err:  # keep the other commands usable
        p = sub.add_parser(name, help=f"{help_} (unavailable: {err})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_unavailable(name, err))


def build_parser() -> argparse.ArgumentParser:
    import dmx
    from dmx import demo
    from dmx.search import baseline
    from dmx.eval import command as evaluate
    from dmx.eval import report

    parser = _Parser(prog="dmx", description="dMX: mixed-precision OCP MX format search for "
                     "causal LMs, its baselines, evaluation, reports and export.")
    parser.add_argument("--version", action="version", version=f"dmx {dmx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_optional(sub, "search", "dmx.search", "add_search_parser", "run_search",
                  "learn a mixed MX format assignment under a bit budget (dMX)")
    _add_optional(sub, "combine", "dmx.search.combine", "add_combine_parser", "run_combine",
                  "average the offsets of several dmx searches (seeds) into one assignment")
    evaluate.add_eval_parser(sub)
    baseline.add_baseline_parser(sub)
    report.add_report_parser(sub)
    _add_optional(sub, "export", "dmx.export", "add_export_parser", "run_export",
                  "write a deployable checkpoint from an OUT dir")
    demo.add_demo_parser(sub)
    return parser


def _quiet_third_party_imports() -> None:
    """Import-time chatter of optional packages (e.g. torchao built for another Python:
    "Failed to load ...so"; torch's pytree deprecation notes) is not dmx's output and
    would bury its one-line messages; real errors still show."""
    import logging
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _sigterm_as_interrupt() -> None:
    """`kill PID` runs the same cleanup as Ctrl-C (temp dirs removed, checkpoint saved)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. main() called from a worker): leave it
        pass


def main(argv=None) -> int:
    _quiet_third_party_imports()
    _sigterm_as_interrupt()

    def body() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        if getattr(args, "model", None) is not None:  # search, baseline, eval: --model x.gguf
            from dmx.eval.gguf_model import resolve_model_path
            args.model = resolve_model_path(args.model)
        return int(args.func(args) or 0)

    # the project's one error frame (mxref.cliframe): DMXError -> one line, exit 2; a
    # broken pipe, Ctrl-C and OS errors the same way as mxref and mxverify
    return run_cli("dmx", body, interrupt_note=" (Ctrl-C); nothing half-written was left behind")


if __name__ == "__main__":
    sys.exit(main())
