"""The oneDNN convolutions of jaxnas.native: second derivatives, threads, and what happens
where they cannot be built. (First derivatives and vmap against XLA's conv for every conv
impl: tests/test_models.py.)"""

import os
import re
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import native
from jaxnas.ops import conv as net_lib

from conftest import run_child, run_python, skip_unless_onednn


@pytest.mark.parametrize("stride", [1, 2])
def test_onednn_second_derivatives_match_xla(stride):
  # Reverse over reverse (DARTS' mixed second derivative) goes through the custom VJPs of
  # the input and kernel gradients.
  skip_unless_onednn()
  rng = np.random.default_rng(stride)
  x = rng.standard_normal((3, 9, 8, 4), np.float32)
  w = 0.3 * rng.standard_normal((3, 3, 4, 6), np.float32)

  def second(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(net_lib.conv2d(x, w, stride, impl=impl)))
    gw_sq = lambda x, w: jnp.sum(jax.grad(loss, 1)(x, w) ** 2)
    gx_sq = lambda x, w: jnp.sum(jax.grad(loss, 0)(x, w) ** 2)
    return jax.jit(lambda x, w: (jax.grad(gw_sq, (0, 1))(x, w), jax.grad(gx_sq, (0, 1))(x, w)))(
        x, w)

  chex.assert_trees_all_close(second("onednn"), second("xla"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride, k, dilation", [(1, 3, 1), (2, 5, 1), (1, 7, 1), (1, 3, 2),
                                                (2, 5, 2)])
def test_onednn_depthwise_matches_xla_to_second_order(stride, k, dilation):
  """oneDNN's grouped convolution (groups = channels) computes XLA's depthwise conv, its
  gradients, and reverse over reverse, at odd sizes that do not fill oneDNN's vectors,
  undilated and dilated (DARTS' dil_conv)."""
  from jaxnas.ops.depthwise import depthwise, depthwise_reference
  skip_unless_onednn()
  rng = np.random.default_rng(k)
  x = rng.standard_normal((3, 11, 9, 19), np.float32)
  w = 0.3 * rng.standard_normal((k, k, 1, 19), np.float32)

  def second(f):
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w, stride)))
    gw_sq = lambda x, w: jnp.sum(jax.grad(loss, 1)(x, w) ** 2)
    return jax.jit(lambda x, w: (f(x, w, stride), jax.grad(loss, (0, 1))(x, w),
                                 jax.grad(gw_sq, (0, 1))(x, w)))(x, w)

  oned = second(lambda x, w, s: depthwise(x, w, s, dilation, impl="onednn"))
  ref = second(lambda x, w, s: depthwise_reference(x, w, s, dilation))
  for a, b in zip(jax.tree.leaves(oned), jax.tree.leaves(ref)):  # second order: ~1e3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("form", ["shared", "batched", "nested"])
def test_vmapped_onednn_depthwise_is_one_wider_depthwise_conv(form):
  """Under vmap over kernels (a supernet's edge group: one shared input or one input per
  edge; nested: a vmap over two inputs of a vmap over each one's edges, the DARTS cell
  inputs' group), the oneDNN depthwise conv folds every mapped axis into its channels:
  the same values, gradients and reverse over reverse as XLA's grouped conv, and no loop."""
  from jaxnas.ops.depthwise import depthwise, depthwise_reference
  skip_unless_onednn()
  rng = np.random.default_rng(3)
  x = rng.standard_normal({"shared": (3, 11, 9, 7), "batched": (4, 3, 11, 9, 7),
                           "nested": (2, 3, 11, 9, 7)}[form], np.float32)
  w = 0.3 * rng.standard_normal(((2, 4) if form == "nested" else (4,)) + (5, 5, 1, 7),
                                np.float32)

  def second(f):
    batched = jax.vmap(lambda x, w: f(x, w, 2), in_axes=(0 if form == "batched" else None, 0))
    if form == "nested":
      batched = jax.vmap(batched)
    loss = lambda x, w: jnp.sum(jnp.sin(batched(x, w)))
    gw_sq = lambda x, w: jnp.sum(jax.grad(loss, 1)(x, w) ** 2)
    return jax.jit(lambda x, w: (batched(x, w), jax.grad(loss, (0, 1))(x, w),
                                 jax.grad(gw_sq, (0, 1))(x, w)))

  onednn = second(lambda x, w, s: depthwise(x, w, s, impl="onednn"))
  for a, b in zip(jax.tree.leaves(onednn(x, w)), jax.tree.leaves(second(depthwise_reference)(x, w))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
  assert "while" not in onednn.lower(x, w).as_text()


def test_onednn_calls_run_inside_scan_and_switch():
  # The training program's control flow: a step loop whose edges are switch branches.
  skip_unless_onednn()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  ws = rng.standard_normal((4, 3, 3, 3, 3), np.float32)

  def run(impl):
    def body(x, w_op):
      w, op = w_op
      branches = (lambda x: net_lib.conv2d(x, w, impl=impl), lambda x: x + 1.0)
      return jnp.tanh(jax.lax.switch(op, branches, x)), None
    loss = lambda x: jnp.sum(jax.lax.scan(body, x, (ws, jnp.array([0, 1, 0, 0])))[0])
    return jax.jit(jax.value_and_grad(loss))(x)

  chex.assert_trees_all_close(run("onednn"), run("xla"), atol=1e-5, rtol=1e-5)


def test_without_a_compiler_cpu_falls_back_to_taps_and_says_why(tmp_path, monkeypatch):
  code = ("from jaxnas import native; from jaxnas.ops import conv as n; "
          "print(n.conv_impl('cpu')); print(native.onednn_status())")
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  impl, why = run_child(code).splitlines()
  assert impl == "taps"
  assert "no C++ compiler 'no-such-compiler'" in why
  assert os.listdir(tmp_path) == []
  monkeypatch.setenv("JAXNAS_ONEDNN", "0")
  assert run_child(code).splitlines() == ["taps", "turned off by JAXNAS_ONEDNN=0"]


def test_missing_onednn_headers_name_the_package(tmp_path, monkeypatch):
  fake = tmp_path / "fake-cxx"
  fake.write_text("#!/bin/sh\necho 'onednn_conv.cc:21:10: fatal error: oneapi/dnnl/dnnl.hpp: "
                  "No such file or directory' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path / "cache"))
  with pytest.raises(native.NativeBuildError, match=r"apt-get install libdnnl-dev.*dnnl\.hpp"):
    native.library_path()
  assert os.listdir(tmp_path / "cache") == []  # no partial library left behind


def test_onednn_unavailable_is_a_clear_error_when_asked_for(monkeypatch):
  monkeypatch.setattr(native, "onednn_status", lambda: "no C++ compiler 'x' on PATH")
  with pytest.raises(ValueError, match="conv impl 'onednn' is unavailable: no C\\+\\+ compiler"):
    net_lib.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="onednn")


def test_threads_share_the_cores_among_local_devices(monkeypatch):
  monkeypatch.delenv("JAXNAS_ONEDNN_THREADS", raising=False)
  cores = len(os.sched_getaffinity(0))
  assert native.onednn_threads() == max(1, cores // jax.local_device_count())
  monkeypatch.setenv("JAXNAS_ONEDNN_THREADS", "3")
  assert native.onednn_threads() == net_lib._onednn_threads() == 3


def test_a_onednn_outside_the_system_paths_is_compiled_and_linked_against(monkeypatch, tmp_path):
  # PyPI's onednn-devel-cpu-gomp / onednn-cpu-gomp, or any prefix with include/ and lib/.
  monkeypatch.setenv("JAXNAS_ONEDNN_ROOT", str(tmp_path))
  command = native._compile_command("out.so")
  assert [f"-I{tmp_path}/include", f"-L{tmp_path}/lib",
          f"-Wl,-rpath,{tmp_path}/lib"] == command[7:10]
  monkeypatch.delenv("JAXNAS_ONEDNN_ROOT")
  monkeypatch.setattr(native.sys, "prefix", str(tmp_path))
  assert native.onednn_root() is None  # no headers here
  (tmp_path / "include" / "oneapi" / "dnnl").mkdir(parents=True)
  (tmp_path / "include" / "oneapi" / "dnnl" / "dnnl.hpp").write_text("")
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "libdnnl.so.3").write_text("")
  assert native.onednn_root() == str(tmp_path)


# A child that trains a conv at two shapes (two traces) through conv_impl()'s CPU default,
# then names that default.
_TRAIN_TWICE = (
    "import jax, jax.numpy as jnp; from jaxnas.ops import conv as n\n"
    "loss = lambda x, w: jnp.sum(n.conv2d(x, w) ** 2)\n"
    "for size in (5, 6):\n"
    "  jax.jit(jax.grad(loss, 1))(jnp.ones((1, size, size, 2)), jnp.ones((3, 3, 2, 2)))\n"
    "print(n.conv_impl('cpu'))\n")


@pytest.mark.parametrize("env, reason", [
    ({"JAXNAS_ONEDNN": "0"}, "turned off by JAXNAS_ONEDNN=0"),
    ({"CXX": "/nonexistent/g++"},
     "no C++ compiler '/nonexistent/g++' on PATH (set CXX, or install g++)"),
], ids=["turned_off", "no_compiler"])
def test_a_cpu_fallback_is_said_once_on_stderr(env, reason, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path))
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  proc = run_python(["-c", _TRAIN_TWICE])
  assert proc.stdout.split() == ["taps"]
  said = [line for line in proc.stderr.splitlines() if "oneDNN" in line]
  assert said == [f"jaxnas: warning: oneDNN convolutions unavailable ({reason}); "
                  "CPU convolutions use XLA's (slower)"]
  # Not when the caller picked the impl, nor from `python -m jaxnas.native`, which reports.
  explicit = _TRAIN_TWICE.replace("n.conv2d(x, w)", "n.conv2d(x, w, impl='taps')")
  assert "oneDNN" not in run_python(["-c", explicit.rsplit("print", 1)[0]]).stderr
  cli = subprocess.run([sys.executable, "-m", "jaxnas.native"], capture_output=True, text=True)
  assert (cli.returncode, cli.stderr) == (1, f"jaxnas oneDNN convolutions unavailable: {reason}\n")


@pytest.mark.parametrize("damage", ["garbage", "other_library"])
def test_a_cached_library_that_does_not_load_is_rebuilt(damage, tmp_path, monkeypatch):
  skip_unless_onednn()
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path))
  path = native.library_path()
  with open(path, "wb") as f:
    if damage == "garbage":  # a truncated or overwritten file: dlopen fails
      f.write(b"\x7fELF not really")
    else:  # loads, but has no handlers: dlsym fails
      import _ctypes
      with open(_ctypes.__file__, "rb") as other:
        f.write(other.read())
  proc = run_python(["-c", _TRAIN_TWICE + "from jaxnas import native\n"
                     "print(native.onednn_status())\n"])
  assert proc.stdout.split() == ["onednn", "None"]
  assert "oneDNN" not in proc.stderr
  with open(path, "rb") as f:
    assert f.read(4) == b"\x7fELF" and len(f.read()) > 10_000
  assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_the_build_is_killed_after_its_time_limit(tmp_path, monkeypatch):
  fake = tmp_path / "slow-cxx"  # answers --version, then compiles forever in a grandchild
  fake.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && exec g++ --version\n"
                  f"sleep 60 &\necho $! > {tmp_path}/sleep.pid\nwait\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("JAXNAS_NATIVE_BUILD_TIMEOUT", "1")
  start = time.monotonic()
  with pytest.raises(native.NativeBuildError,
                     match=r"^building onednn_conv\.cc timed out after 1 s \(JAXNAS_NATIVE_"):
    native.library_path()
  assert time.monotonic() - start < 10
  assert os.listdir(tmp_path / "cache") == []  # no partial library left behind
  pid = int((tmp_path / "sleep.pid").read_text())
  # The whole process group is killed: gone, or a zombie awaiting init. SIGKILL takes
  # effect when the process next runs, which on a loaded machine may be a moment later.
  state, deadline = "R", time.monotonic() + 5
  while state != "Z" and time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
      break
    time.sleep(0.05)
  else:
    assert state == "Z", f"the compiler's grandchild {pid} survived the time limit ({state})"


def test_the_cache_key_holds_the_compiler_and_onednn_versions(tmp_path, monkeypatch):
  fake = tmp_path / "cxx"  # one compiler path whose --version changes
  fake.write_text("#!/bin/sh\necho \"g++ (Fake) $FAKE_CXX_VERSION\"\n")
  fake.chmod(0o755)
  (tmp_path / "include" / "oneapi" / "dnnl").mkdir(parents=True)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("JAXNAS_ONEDNN_ROOT", str(tmp_path))

  def path(cxx_version, onednn_version):
    monkeypatch.setenv("FAKE_CXX_VERSION", cxx_version)
    major, minor, patch = onednn_version.split(".")
    (tmp_path / "include" / "oneapi" / "dnnl" / "dnnl_version.h").write_text(
        f"#define DNNL_VERSION_MAJOR {major}\n#define DNNL_VERSION_MINOR {minor}\n"
        f"#define DNNL_VERSION_PATCH {patch}\n#define DNNL_VERSION_HASH \"abc\"\n")
    native._compiler_version.cache_clear()  # once per process, normally
    native._header_version.cache_clear()
    assert native.compiler_version() == f"g++ (Fake) {cxx_version}"
    assert native.onednn_header_version() == f"{onednn_version} abc"
    return native._cached_path()

  try:
    paths = {path("12.2.0", "2.7.3"), path("12.2.0", "2.7.3"), path("13.1.0", "2.7.3"),
             path("12.2.0", "3.4.1")}
  finally:
    native._compiler_version.cache_clear()
    native._header_version.cache_clear()
  assert len(paths) == 3


def test_describe_says_what_a_run_records(monkeypatch):
  skip_unless_onednn()
  d = native.describe()
  assert d == {"onednn": True, "reason": None, "onednn_version": d["onednn_version"],
               "compiler": native.compiler_version(), "threads": native.onednn_threads()}
  assert re.fullmatch(r"\d+\.\d+\.\d+", d["onednn_version"])
  assert native.onednn_header_version().startswith(d["onednn_version"])
  monkeypatch.setattr(native, "_load", lambda: (None, "turned off by JAXNAS_ONEDNN=0"))
  assert native.describe() == {"onednn": False, "reason": "turned off by JAXNAS_ONEDNN=0",
                               "onednn_version": None, "compiler": None, "threads": None}


def test_an_exception_in_onednn_is_an_error_not_an_abort():
  # An output shape the conv cannot have: oneDNN throws creating the primitive.
  skip_unless_onednn()
  code = ("import jax.numpy as jnp; from jaxnas import native\n"
          "from jaxnas.ops import conv as n\n"
          "assert native.onednn_available()  # registers the handlers\n"
          "x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))\n"
          "for shape, stride in (((1, 1, 1, 1), 1), ((1, 4, 4, 1), 0)):\n"
          "  try:\n"
          "    n._onednn('jaxnas_onednn_conv_fwd', shape, x, w, (stride, 0, 1, 1)).block_until_ready()\n"
          "  except Exception as e:\n"
          "    print(type(e).__name__, str(e).splitlines()[0])\n"
          "print(float(n.conv2d(x, w, impl='onednn').sum()))\n")
  thrown, checked, after = run_child(code).splitlines()
  assert re.match(r"\w*RuntimeError INTERNAL: jaxnas oneDNN conv: could not create", thrown)
  assert re.match(r"\w*RuntimeError INVALID_ARGUMENT: .* needs stride >= 1", checked)
  assert after == "100.0"  # the process goes on
