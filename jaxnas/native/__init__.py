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
``ops.conv2d(..., impl="onednn")`` calls them; ``ops.conv_impl()`` picks it
on CPU whenever ``onednn_available()``.

  python -m jaxnas.native      # build now (also done lazily at first use) and report

When CPU training would use them but cannot, one line on stderr says why, once per
process (``onednn_available(warn=True)``, the CPU default of ``ops.conv_impl()``);
``describe()`` is what a run records about them. The cached library's name hashes the
source, jaxlib's version, the compile command, the compiler's ``--version`` and
oneDNN's version (from ``dnnl_version.h``), so upgrading any builds afresh; a cached
library that does not load is removed and built again once.

oneDNN 2.x (Debian 12) and 3.x (PyPI's ``onednn-devel-cpu-gomp``; Debian 13) both build.

Environment: ``JAXNAS_ONEDNN=0`` turns it off; ``JAXNAS_ONEDNN_ROOT`` names a oneDNN
installation outside the system's paths (``include/``, ``lib/``; default: this Python
environment when it holds one); ``JAXNAS_ONEDNN_THREADS`` sets the OpenMP
threads per call (default: cores / local devices); ``JAXNAS_NATIVE_DIR`` (default
``$XDG_CACHE_HOME/jaxnas/native``, i.e. ``~/.cache/...``) holds the built
library; ``CXX`` names the compiler (default ``g++``); ``JAXNAS_NATIVE_BUILD_TIMEOUT``
limits the build (default 300 s).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import signal
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


def _timeout() -> float:
  """Seconds a compiler call may take: ``$JAXNAS_NATIVE_BUILD_TIMEOUT``, default 300."""
  value = os.environ.get("JAXNAS_NATIVE_BUILD_TIMEOUT", "300")
  try:
    return float(value)
  except ValueError:
    raise NativeBuildError(f"JAXNAS_NATIVE_BUILD_TIMEOUT={value!r} is not a number of "
                           "seconds") from None


def _run(command: list[str], what: str) -> subprocess.CompletedProcess:
  """Runs ``command`` within the time limit; on timeout (or Ctrl-C) kills its whole process
  group (the compiler's cc1plus, as and ld too) and raises ``NativeBuildError``."""
  timeout = _timeout()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except BaseException as e:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass  # all gone already
    proc.communicate()
    if isinstance(e, subprocess.TimeoutExpired):
      raise NativeBuildError(f"{what} timed out after {timeout:g} s "
                             "(JAXNAS_NATIVE_BUILD_TIMEOUT)") from None
    raise
  return subprocess.CompletedProcess(command, proc.returncode, out, err)


def compiler_version(cxx: str | None = None) -> str | None:
  """The first line of ``cxx --version`` (default ``$CXX``, else ``g++``; e.g.
  ``g++ (Debian 12.2.0-14) 12.2.0``), or ``None`` where there is no such compiler; asked
  once per process and compiler."""
  return _compiler_version(cxx or os.environ.get("CXX", "g++"))


@functools.cache
def _compiler_version(cxx: str) -> str | None:
  if shutil.which(cxx) is None:
    return None
  done = _run([cxx, "--version"], f"{cxx} --version")
  lines = (done.stdout or done.stderr).splitlines()
  return lines[0].strip() if lines else None


def _include_dirs() -> list[str]:
  """Where the compiler looks for ``oneapi/dnnl/``: the ``-I`` of ``_compile_command``,
  then ``CPLUS_INCLUDE_PATH`` and ``CPATH``, then the system's directories."""
  root = onednn_root()
  dirs = [os.path.join(root, "include")] if root else []
  for var in ("CPLUS_INCLUDE_PATH", "CPATH"):
    dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
  return dirs + ["/usr/local/include", "/usr/include"]


@functools.cache
def _header_version(dirs: tuple[str, ...]) -> str | None:
  for d in dirs:
    try:
      with open(os.path.join(d, "oneapi", "dnnl", "dnnl_version.h")) as f:
        text = f.read()
    except OSError:
      continue
    fields = dict(re.findall(r'#define\s+DNNL_VERSION_(MAJOR|MINOR|PATCH|HASH)\s+"?([^\s"]*)',
                             text))
    return " ".join([".".join(fields.get(f, "?") for f in ("MAJOR", "MINOR", "PATCH")),
                     fields.get("HASH", "")]).strip()
  return None


def onednn_header_version() -> str | None:
  """The oneDNN version the kernels compile against (``DNNL_VERSION_*`` and its commit
  hash from the first ``oneapi/dnnl/dnnl_version.h`` the compiler would include, e.g.
  ``2.6.3 N/A``), or ``None`` where there is none (the build then fails and says why)."""
  return _header_version(tuple(_include_dirs()))


def _cached_path() -> str:
  """Where the library for this source, jaxlib, compile command, compiler (its
  ``--version``) and oneDNN (its header version) is cached: an upgrade of any builds afresh."""
  import jaxlib
  with open(_SOURCE, "rb") as f:
    source = f.read()
  command = _compile_command("OUT")
  key = [jaxlib.__version__, " ".join(command), compiler_version(command[0]) or "",
         onednn_header_version() or ""]
  digest = hashlib.sha256(source + "\0".join(key).encode()).hexdigest()[:16]
  return os.path.join(native_dir(), f"libjaxnas_onednn-{digest}.so")


def library_path() -> str:
  """The cached library (``_cached_path``), built if missing.

  Concurrent builders (test workers) each write a temporary file and rename it into
  place. The build is killed after ``$JAXNAS_NATIVE_BUILD_TIMEOUT`` seconds (300).
  """
  path = _cached_path()
  if os.path.exists(path):
    return path
  os.makedirs(native_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=native_dir())
  os.close(fd)
  try:
    done = _run(_compile_command(tmp), f"building {os.path.basename(_SOURCE)}")
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


def _open(path: str) -> ctypes.CDLL:
  """Loads the library at ``path`` and checks it has the handlers; ``OSError`` if not."""
  lib = ctypes.cdll.LoadLibrary(path)
  missing = [symbol for symbol in _TARGETS.values() if not hasattr(lib, symbol)]
  if missing:
    import _ctypes
    _ctypes.dlclose(lib._handle)  # else loading the rebuilt file at this path gets this one
    raise OSError(f"{path}: no symbol {missing[0]}")
  return lib


def _open_or_rebuild() -> ctypes.CDLL:
  """The library, loaded; a cached one that does not load (truncated, from another
  toolchain, missing symbols) is removed and built again once."""
  path = library_path()
  try:
    return _open(path)
  except OSError:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass  # another process removed it first
  path = library_path()
  try:
    return _open(path)
  except OSError as e:
    raise NativeBuildError(f"the freshly built library does not load: {e}") from None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
  """Builds, loads and registers the handlers once per process: the library, or why not."""
  value = os.environ.get("JAXNAS_ONEDNN", "1")
  if value.lower() in ("0", "false", "no", "off"):
    return None, f"turned off by JAXNAS_ONEDNN={value}"
  try:
    lib = _open_or_rebuild()
  except (NativeBuildError, OSError) as e:
    return None, str(e)
  import jax.ffi
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib, None


def onednn_status() -> str | None:
  """``None`` when the oneDNN convolutions are ready, else the reason they are not."""
  return _load()[1]


@functools.cache
def _warn(why: str) -> None:
  print(f"jaxnas: warning: oneDNN convolutions unavailable ({why}); CPU convolutions use "
        "XLA's (slower)", file=sys.stderr, flush=True)


def onednn_available(warn: bool = False) -> bool:
  """Whether ``conv2d(..., impl="onednn")`` can run here (builds the library on first use).

  ``warn``: where not, say why in one line on stderr, once per process (the CPU default
  of ``conv_impl()`` falling back; a caller that asks for another impl is not warned).
  """
  why = onednn_status()
  if why is not None and warn:
    _warn(why)
  return why is None


def onednn_threads() -> int:
  """OpenMP threads per oneDNN call: ``$JAXNAS_ONEDNN_THREADS``, else this process's cores
  shared by its local devices (one single-threaded CPU device per core, as
  ``bench_population.py`` and ``--cpu_devices`` set up, gives 1). oneDNN's kernel gradients
  split their sums over threads, so results depend on this number at float level."""
  if os.environ.get("JAXNAS_ONEDNN_THREADS"):
    return max(1, int(os.environ["JAXNAS_ONEDNN_THREADS"]))
  import jax
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, (cores or 1) // jax.local_device_count())


class _Version(ctypes.Structure):
  _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
              ("hash", ctypes.c_char_p)]


def describe() -> dict:
  """What a run records about its CPU convolutions (builds the library on first use):
  ``onednn`` (whether ``conv_impl()``'s CPU default is oneDNN), ``reason`` (why not, or
  ``None``) and, when it is, ``onednn_version`` (the loaded library's, e.g. ``"2.6.3"``),
  ``compiler`` (``compiler_version()``) and ``threads`` (``onednn_threads()``); these
  three are ``None`` when it is not."""
  lib, why = _load()
  if lib is None:
    return {"onednn": False, "reason": why, "onednn_version": None, "compiler": None,
            "threads": None}
  version = lib.dnnl_version  # oneDNN's C API, from the libdnnl this library links
  version.restype = ctypes.POINTER(_Version)
  v = version().contents
  return {"onednn": True, "reason": None, "onednn_version": f"{v.major}.{v.minor}.{v.patch}",
          "compiler": compiler_version(), "threads": onednn_threads()}


def main() -> int:
  why = onednn_status()
  if why is None:
    d = describe()
    print(f"jaxnas oneDNN convolutions ready: {library_path()} (oneDNN {d['onednn_version']}, "
          f"{d['compiler']}, {d['threads']} threads per call)")
    return 0
  print(f"jaxnas oneDNN convolutions unavailable: {why}", file=sys.stderr)
  return 1
