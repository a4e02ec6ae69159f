"""Running an absl command line: every bad input ends in one `error: ...` line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging

from triattention_jax.errors import UserError

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --helpshort)")


def run_cli(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with flag errors and `UserError`s reported as a single line."""

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}: every input is a --flag")
        try:
            main(argv)
        except UserError as e:
            _fail(str(e))

    app.run(guarded, flags_parser=_parse_flags)
