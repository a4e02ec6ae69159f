"""Running an absl command line: every bad input ends in one `error: ...` line and exit code 2.

Nothing here imports jax, so flags (and `--help`) are parsed before the heavy imports.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from absl import app, flags, logging

from triattention_jax.compilation_cache import default_location, enable_compilation_cache
from triattention_jax.errors import UserError

# The registered policies' names (`policies.policy_names()`, which imports jax; a test keeps them equal).
METHOD_NAMES = (
    "expected_attention",
    "expected_attention_calibrated",
    "full",
    "h2o",
    "random",
    "rkv",
    "snapkv",
    "streaming",
    "triattention",
    "triattention_fit",
)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "-?")

flags.DEFINE_string(
    "compilation_cache",
    default_location(),
    "Folder of the persistent XLA compilation cache (a second run compiles nothing the first compiled); "
    "'off' disables it. Default: $TRIATTENTION_COMPILATION_CACHE or ~/.cache/triattention_jax/xla.",
)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e} (see --helpshort)")
    except SystemExit:
        # absl prints the usage for --help and exits 1; asking for help is not a failure.
        if any(arg.split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
            sys.exit(0)
        raise


_interrupted = False


def _on_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raises KeyboardInterrupt once Ctrl-C was pressed: for callbacks that run between pieces of
    work, because native code can swallow the exception the signal raised (seen under load)."""
    if _interrupted:
        raise KeyboardInterrupt


def run_cli(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with flag errors and `UserError`s reported as a single line, Ctrl-C as
    one line with exit code 130, and the persistent compilation cache enabled."""

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            _fail(f"unexpected arguments {argv[1:]}: every input is a --flag")
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_interrupt)
        try:
            enable_compilation_cache(flags.FLAGS.compilation_cache)
            main(argv)
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            # Every `finally` has run by now (staging folders removed); exiting at once skips the
            # interpreter's shutdown, which can wait on the accelerator runtime's threads.
            print("error: interrupted", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)

    app.run(guarded, flags_parser=_parse_flags)
