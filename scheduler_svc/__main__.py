"""`pagedserve-scheduler`: run the scheduler alone.

Until the gRPC frontend and engine connect it to executors, running alone means driving the
scheduling policy over a synthetic trace against the token-level simulated executor, with the
configuration given by flags or PAGEDSERVE_* environment variables, and printing what it scheduled.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clients import simulate_command
from scheduler_svc.errors import InvalidArgumentError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve-scheduler` console script."""
    parser = argparse.ArgumentParser(prog="pagedserve-scheduler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    simulate_command.add_arguments(parser)
    parser.set_defaults(modes="config")
    args = parser.parse_args(argv)
    try:
        return simulate_command.run(args)
    except InvalidArgumentError as err:
        print(f"pagedserve-scheduler: invalid {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
