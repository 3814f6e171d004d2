"""The ``procpool`` command (also ``python -m procpool``).

Only ``procpool run`` exists today; see ``procpool run --help`` and docs/cli.md.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``procpool`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 all records succeeded, 1 some failed, 2 a usage,
        TARGET, INPUT, OUTPUT or journal problem (nothing ran), 130 interrupted.
    """
    from ._cli._args import build_parser, run_options
    from ._cli._run import EXIT_INTERRUPTED, EXIT_USAGE, CliError, run

    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return run(run_options(ns), args)
    except CliError as exc:
        print(f"procpool run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("procpool run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
