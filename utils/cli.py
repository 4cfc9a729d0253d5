"""How every script fails on bad input: one line on stderr, a non-zero exit, no traceback."""
import os
import sys


class UserError(Exception):
    """Bad input the user can fix. `exit_code` lets a script keep distinct codes (2 = usage/bad input)."""

    exit_code = 2

    def __init__(self, message, exit_code=None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def run_cli(main, argv=None):
    """Call main(argv); turn a UserError into `error: <message>` and its exit code."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `--help | head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
