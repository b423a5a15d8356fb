"""Does an exception thrown inside a torch C++/CUDA extension reach Python on this machine?

Builds small extensions with `torch.utils.cpp_extension.load_inline` (C++ only; bound with a plain
pybind11 m.def instead of torch::wrap_pybind_function; C++ + CUDA with the flags executor_svc/ops.py
uses) whose functions throw std::runtime_error or fail a TORCH_CHECK, calls
each in a child interpreter, and prints the exit status of each call next to the toolchain versions.
A clean run prints "RuntimeError" for every case; a crash shows as a negative exit status (signal).

    python benchmarks/device/extension_exception_probe.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

CPP = r"""
#include <torch/extension.h>
#include <sstream>
#include <stdexcept>
void throw_runtime(const at::Tensor& t) { throw std::runtime_error("plain runtime_error"); }
void torch_check(const at::Tensor& t) { TORCH_CHECK(false, "TORCH_CHECK failed"); }
void stream_message(const at::Tensor& t) {
  std::ostringstream message;   // a stream built in the extension itself, then a plain exception
  message << "message built with an ostringstream " << 42;
  throw std::runtime_error(message.str());
}
"""
# The same throwing function bound with a plain m.def, i.e. translated by pybind11 rather than by torch's
# wrap_pybind_function (what load_inline's `functions=` generates).
PLAIN_MODULE = r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("throw_runtime", &throw_runtime);
  m.def("torch_check", &torch_check);
}
"""
CUDA = r"""
#include <ATen/ATen.h>
__global__ void noop() {}
void launch(const at::Tensor& t) { noop<<<1, 1>>>(); TORCH_CHECK(false, "TORCH_CHECK failed in a .cu"); }
"""

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, cuda, flags, function = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
functions = ["throw_runtime", "torch_check", "stream_message"]
kwargs = dict(name=name, cpp_sources=[CPP], functions=None if cuda else functions,
              extra_cflags=["-O2"], build_directory=sys.argv[5], verbose=False)
if flags == "plain":
    kwargs.update(cpp_sources=[CPP + PLAIN_MODULE], functions=None)
elif cuda:
    kwargs.update(cpp_sources=[CPP + "void launch(const at::Tensor& t);"], cuda_sources=[CUDA],
                  functions=["throw_runtime", "torch_check", "launch"], extra_cuda_cflags=flags.split())
module = load_inline(**kwargs)
try:
    getattr(module, function)(torch.zeros(1))
except RuntimeError as err:
    print("RuntimeError:", str(err).splitlines()[0])
"""


def toolchain() -> None:
    """Print the compilers and the ABI-relevant torch build settings."""
    import torch

    print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
    config = torch.__config__.show()
    compilers = [line.strip() for line in config.splitlines()
                 if line.strip().startswith(("- GCC", "- clang"))]
    cxx = re.search(r"CXX_COMPILER=([^,]+)", config)
    print("torch built with:", compilers, cxx.group(1) if cxx else "?")
    print("torch C++11 ABI:", torch._C._GLIBCXX_USE_CXX11_ABI, "pybind11 ABI:",
          getattr(torch._C, "_PYBIND11_BUILD_ABI", "?"), getattr(torch._C, "_PYBIND11_COMPILER_TYPE", "?"),
          getattr(torch._C, "_PYBIND11_STDLIB", "?"))
    for tool in (["c++", "--version"], ["g++", "--version"], ["nvcc", "--version"]):
        try:
            out = subprocess.run(tool, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            print(" ".join(tool), "->", out[0] if tool[0] != "nvcc" else out[-1])
        except OSError as exc:
            print(" ".join(tool), "->", exc)


def main() -> int:
    """Run every case; exit 1 if any call did not raise RuntimeError cleanly."""
    toolchain()
    build_root = tempfile.mkdtemp(prefix="probe-")
    ops_flags = " ".join(["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                          "-gencode=arch=compute_80,code=sm_80"])
    cases = [("cpp_only", "0", "", "throw_runtime"), ("cpp_only", "0", "", "torch_check"),
             ("cpp_only", "0", "", "stream_message"),
             ("plain_def", "0", "plain", "throw_runtime"), ("plain_def", "0", "plain", "torch_check"),
             ("with_cuda", "1", ops_flags, "throw_runtime"), ("with_cuda", "1", ops_flags, "torch_check"),
             ("with_cuda", "1", ops_flags, "launch")]
    children = []
    for index, (name, cuda, flags, function) in enumerate(cases):
        # One build directory and module name per case, so the builds run side by side.
        build = os.path.join(build_root, f"case{index}")
        os.makedirs(build, exist_ok=True)
        child = f"CPP = {CPP!r}\nCUDA = {CUDA!r}\nPLAIN_MODULE = {PLAIN_MODULE!r}\n" + CHILD
        children.append(subprocess.Popen([sys.executable, "-c", child, f"probe_{name}_{index}", cuda, flags,
                                          function, build], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    failures = 0
    for (name, _, _, function), proc in zip(cases, children, strict=True):
        stdout, stderr = proc.communicate(timeout=600)
        ok = proc.returncode == 0 and "RuntimeError" in stdout
        failures += not ok
        print(f"{name:10s} {function:14s} exit {proc.returncode:4d}  {stdout.strip()[:80]}"
              + ("" if ok else f"\n    stderr: {stderr.strip()[-600:]}"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
