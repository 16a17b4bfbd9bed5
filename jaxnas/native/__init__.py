"""Native kernels built on the machine that runs them: oneDNN convolutions for XLA:CPU.

XLA:CPU's convolutions are the largest cost of training NB201 networks on a CPU
(experiments/NOTES_population.md, rounds 5-12): it sends 16-channel convs to
Eigen and runs the others through YNNPACK at well under the FMA peak, and its
gradients need hand-written forms. oneDNN (the library PyTorch's CPU convs
run on) has JIT kernels for NHWC activations that run the issue-3 benchmark's
convs 2-4x faster. ``onednn_conv.cc`` wraps its forward, input-gradient and
kernel-gradient primitives as XLA FFI handlers; this module compiles it once
per machine (a C++ compiler and oneDNN's headers, Debian's ``libdnnl-dev``),
caches the library, registers the handlers and reports why when it cannot.
``nb201_net.conv2d(..., impl="onednn")`` calls them; ``conv_impl()`` picks it
on CPU whenever ``onednn_available()``.

  python -m jaxnas.native      # build now (also done lazily at first use) and report

oneDNN 2.x (Debian 12) and 3.x (PyPI's ``onednn-devel-cpu-gomp``; Debian 13) both build.

Environment: ``JAXNAS_ONEDNN=0`` turns it off; ``JAXNAS_ONEDNN_ROOT`` names a oneDNN
installation outside the system's paths (``include/``, ``lib/``; default: this Python
environment when it holds one); ``JAXNAS_ONEDNN_THREADS`` sets the OpenMP
threads per call (default: cores / local devices); ``JAXNAS_NATIVE_DIR`` (default
``$XDG_CACHE_HOME/jaxnas/native``, i.e. ``~/.cache/...``) holds the built
library; ``CXX`` names the compiler (default ``g++``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_TARGETS = {"jaxnas_onednn_conv_fwd": "JaxnasOnednnConvFwd",
            "jaxnas_onednn_conv_bwd_data": "JaxnasOnednnConvBwdData",
            "jaxnas_onednn_conv_bwd_weights": "JaxnasOnednnConvBwdWeights"}


class NativeBuildError(RuntimeError):
  """The oneDNN kernels cannot be built or loaded here; the message says why."""


def native_dir() -> str:
  """Where built libraries are cached: ``$JAXNAS_NATIVE_DIR`` or ``~/.cache/jaxnas/native``."""
  if os.environ.get("JAXNAS_NATIVE_DIR"):
    return os.environ["JAXNAS_NATIVE_DIR"]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxnas", "native")


def _compile_command(output: str) -> list[str]:
  try:
    import jax.ffi
    include = jax.ffi.include_dir()
  except (ImportError, AttributeError) as e:
    raise NativeBuildError(f"this jax has no XLA FFI headers ({e}); jax >= 0.4.38 has") from None
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise NativeBuildError(f"no C++ compiler {cxx!r} on PATH (set CXX, or install g++)")
  root = onednn_root()
  where = [f"-I{root}/include", f"-L{root}/lib", f"-Wl,-rpath,{root}/lib"] if root else []
  return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", *where,
          f"-I{include}", _SOURCE, "-o", output, "-ldnnl"]


def onednn_root() -> str | None:
  """Where oneDNN is, if not in the system's paths (Debian's ``libdnnl-dev``):
  ``$JAXNAS_ONEDNN_ROOT``, else this Python environment when it holds oneDNN's headers
  and library (PyPI's ``onednn-devel-cpu-gomp`` and ``onednn-cpu-gomp`` install them
  into its ``include/`` and ``lib/``)."""
  if os.environ.get("JAXNAS_ONEDNN_ROOT"):
    return os.environ["JAXNAS_ONEDNN_ROOT"]
  lib = os.path.join(sys.prefix, "lib")
  if (os.path.exists(os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")) and
      os.path.isdir(lib) and any(f.startswith("libdnnl.so") for f in os.listdir(lib))):
    return sys.prefix
  return None


def library_path() -> str:
  """The cached library for this source, jaxlib and compiler, built if missing.

  The name hashes the source, jaxlib's version and the compile command, so an
  upgrade builds afresh; concurrent builders (test workers) each write a
  temporary file and rename it into place.
  """
  import jaxlib
  with open(_SOURCE, "rb") as f:
    source = f.read()
  command = _compile_command("OUT")
  digest = hashlib.sha256(source + jaxlib.__version__.encode() +
                          " ".join(command).encode()).hexdigest()[:16]
  path = os.path.join(native_dir(), f"libjaxnas_onednn-{digest}.so")
  if os.path.exists(path):
    return path
  os.makedirs(native_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=native_dir())
  os.close(fd)
  try:
    done = subprocess.run(_compile_command(tmp), capture_output=True, text=True)
    if done.returncode != 0:
      errors = [l for l in done.stderr.splitlines() if "error" in l] or done.stderr.splitlines()
      hint = (" (install oneDNN's headers: apt-get install libdnnl-dev, or pip install "
              "onednn-devel-cpu-gomp onednn-cpu-gomp)") if "dnnl" in done.stderr else ""
      raise NativeBuildError(f"building {os.path.basename(_SOURCE)} failed{hint}: "
                             f"{(errors or ['no output'])[0].strip()}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the handlers once per process; ``None`` or why not."""
  if os.environ.get("JAXNAS_ONEDNN", "1").lower() in ("0", "false", "no", "off"):
    return "turned off by JAXNAS_ONEDNN"
  try:
    lib = ctypes.cdll.LoadLibrary(library_path())
  except (NativeBuildError, OSError) as e:
    return str(e)
  import jax.ffi
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return None


def onednn_status() -> str | None:
  """``None`` when the oneDNN convolutions are ready, else the reason they are not."""
  return _load()


def onednn_available() -> bool:
  """Whether ``conv2d(..., impl="onednn")`` can run here (builds the library on first use)."""
  return _load() is None


def main() -> int:
  why = onednn_status()
  if why is None:
    print(f"jaxnas oneDNN convolutions ready: {library_path()}")
    return 0
  print(f"jaxnas oneDNN convolutions unavailable: {why}", file=sys.stderr)
  return 1
