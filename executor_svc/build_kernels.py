"""Build the CUDA kernels (csrc/) into the kernel cache ahead of time, without a GPU.

    python -m executor_svc.build_kernels

`executor_svc.ops` builds the extension on first use, which costs minutes of nvcc the first time an
executor starts on a machine. A container image runs this at build time instead (no GPU there: the
kernels' architectures are fixed by ops.EXTRA_CUDA_CFLAGS, so nothing needs a device), leaving the
ninja build in $PAGEDSERVE_KERNEL_CACHE. At run time ops' `load()` rewrites the same build.ninja,
ninja finds every output up to date, and the executor only imports the cached library.

That holds only while this script and ops pass `load()` the very same name, sources, flags, include
paths and build directory (they are part of build.ninja, and ninja rebuilds when a command line
changes), so every one of them is taken from executor_svc.ops, and a test compares the two calls.
The source paths are absolute: the image must run the executor from the tree it built in.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("pagedserve.build_kernels")

EXTENSION_NAME = "pagedserve_kernels"


class BuildError(RuntimeError):
    """A prerequisite of the kernel build is missing; the message says which and how to get it."""


def load_arguments() -> dict[str, Any]:
    """The keyword arguments of `torch.utils.cpp_extension.load`, exactly as `executor_svc.ops` gives them."""
    from executor_svc import ops

    return {
        "name": EXTENSION_NAME,
        "sources": [str(ops.CSRC / source) for source in ops.SOURCES],
        "extra_cuda_cflags": list(ops.EXTRA_CUDA_CFLAGS),
        "extra_include_paths": [str(ops.CSRC)],
        "build_directory": str(ops.build_directory()),
        "verbose": False,
    }


def find_nvcc() -> Path:
    """nvcc of the CUDA toolkit torch will compile with (raises BuildError when there is none)."""
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        raise BuildError("no CUDA toolkit found: nvcc is not on PATH and CUDA_HOME is not set "
                         "(build on a CUDA -devel image, or set CUDA_HOME)")
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if not nvcc.is_file():
        raise BuildError(f"nvcc not found at {nvcc} (CUDA_HOME={cuda_home}); build on a CUDA -devel image")
    return nvcc


def check_prerequisites() -> Path:
    """Check what the build needs before minutes are spent on it; returns nvcc's path.

    A CPU build of torch cannot compile CUDA extensions, ninja drives the build (also at run time, to
    confirm the cache is current), and nvcc compiles the .cu files.
    """
    import torch

    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is a CPU build; install a CUDA build of torch to build "
                         "the kernels")
    if shutil.which("ninja") is None:
        raise BuildError("ninja is not on PATH (pip install ninja); torch builds extensions with it")
    nvcc = find_nvcc()
    for source in load_arguments()["sources"]:
        if not Path(source).is_file():
            raise BuildError(f"kernel source {source} is missing: run from a source tree that has csrc/ "
                             "(an editable install)")
    return nvcc


def build(verbose: bool = False) -> Path:
    """Compile csrc/ into the kernel cache and return the built library's path.

    The library is imported at the end, as ops does; without a GPU driver that import may fail even
    though the build succeeded, so a built library with a failed import is still a success here (the
    executor imports it on a machine with a driver).
    """
    from torch.utils.cpp_extension import load

    check_prerequisites()
    arguments = load_arguments()
    directory = Path(arguments["build_directory"])
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{EXTENSION_NAME}.so"
    start = time.monotonic()
    try:
        load(**{**arguments, "verbose": verbose})
    except (ImportError, OSError) as err:
        if not library.is_file():
            raise
        log.info("built %s; importing it here failed (%s), which needs the GPU driver at run time",
                 library, err)
    log.info("kernels built into %s in %.0f s", directory, time.monotonic() - start)
    return library


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m executor_svc.build_kernels`: 0 when built, 2 without a prerequisite."""
    parser = argparse.ArgumentParser(prog="python -m executor_svc.build_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show the compiler's command lines")
    parser.add_argument("--print-arguments", action="store_true",
                        help="print the build's arguments and exit without building")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_arguments:
        for key, value in load_arguments().items():
            print(f"{key}: {value}")
        return 0
    try:
        library = build(verbose=args.verbose)
    except BuildError as err:
        print(f"build_kernels: {err}", file=sys.stderr)
        return 2
    print(f"build_kernels: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
