"""The oneDNN convolutions of jaxnas.native: second derivatives, threads, and what happens
where they cannot be built. (First derivatives and vmap against XLA's conv for every conv
impl: tests/test_models.py.)"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import native
from jaxnas.models import nb201_net as net_lib

from conftest import run_child, skip_unless_onednn


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
  code = ("from jaxnas import native; from jaxnas.models import nb201_net as n; "
          "print(n.conv_impl('cpu')); print(native.onednn_status())")
  monkeypatch.setenv("JAXNAS_NATIVE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  impl, why = run_child(code).splitlines()
  assert impl == "taps"
  assert "no C++ compiler 'no-such-compiler'" in why
  assert os.listdir(tmp_path) == []
  monkeypatch.setenv("JAXNAS_ONEDNN", "0")
  assert run_child(code).splitlines() == ["taps", "turned off by JAXNAS_ONEDNN"]


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
  assert net_lib._onednn_threads() == max(1, cores // jax.local_device_count())
  monkeypatch.setenv("JAXNAS_ONEDNN_THREADS", "3")
  assert net_lib._onednn_threads() == 3


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
