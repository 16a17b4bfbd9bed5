// oneDNN convolutions for XLA:CPU, as XLA FFI handlers (jaxnas.native.onednn).
//
// Three handlers, forward, input gradient and kernel gradient of an NHWC x HWIO
// float32 convolution with symmetric zero padding ``pad``, equal strides, equal
// ``dilation`` (1: none) and ``groups`` channel groups (``groups`` = I = O: depthwise, the
// kernel [K,K,1,O]):
//   jaxnas_onednn_conv_fwd(x [N,H,W,I], w [K,K,I/groups,O]) -> y [N,Ho,Wo,O]
//   jaxnas_onednn_conv_bwd_data(g [N,Ho,Wo,O], w [K,K,I/groups,O]) -> dx [N,H,W,I]
//   jaxnas_onednn_conv_bwd_weights(x [N,H,W,I], g [N,Ho,Wo,O]) -> dw [K,K,I/groups,O]
// Activations stay NHWC (no reorder); the kernel is reordered to (or from) the blocked
// layout oneDNN's direct JIT kernels want, which is tiny. XLA:CPU runs each device's
// program on one thread: the primitives, their weight buffers and scratchpads are cached
// per thread and shape, and each call uses ``threads`` OpenMP threads.
#include <omp.h>

#include <array>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;
constexpr auto f32 = memory::data_type::f32;

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution of one kind at one shape, ready to run.
struct Conv {
  dnnl::primitive prim;
  memory act_a, act_b;      // fwd: x, y; bwd_data: g, dx; bwd_weights: x, g
  memory user_w, prim_w;    // the HWIO kernel, and the primitive's (maybe blocked) one
  bool reorder_w = false;
  dnnl::reorder w_reorder;  // user -> primitive (fwd, bwd_data) or back (bwd_weights)
  std::vector<char> w_buffer, scratch;
  memory scratchpad;
};

using Key = std::array<int64_t, 13>;  // kind, n, h, w, i, o, k, stride, pad, ho, wo, groups,
                                      // dilation

std::unique_ptr<Conv> Make(const Key& key) {
  auto [kind, n, h, w, i, o, k, s, p, ho, wo, g, d] = key;
  auto& eng = Engine();
  // oneDNN counts dilation from 0 (no dilation); the kernel spans (k - 1) * d + 1 pixels.
  memory::dims xd{n, i, h, w}, yd{n, o, ho, wo}, st{s, s}, dl{d - 1, d - 1}, pl{p, p};
  const int64_t span = (k - 1) * d + 1;
  memory::dims pr{(ho - 1) * s + span - h - p, (wo - 1) * s + span - w - p};
  auto xm = memory::desc(xd, f32, tag::nhwc), ym = memory::desc(yd, f32, tag::nhwc);
  // Grouped weights are 5-D (groups, O/groups, I/groups, K, K); JAX's [K,K,I/groups,O]
  // with O = group * (O/groups) + o is oneDNN's hwigo.
  auto wd = g == 1 ? memory::dims{o, i, k, k} : memory::dims{g, o / g, i / g, k, k};
  auto wany = memory::desc(wd, f32, tag::any);
  auto wuser = memory::desc(wd, f32, g == 1 ? tag::hwio : tag::hwigo);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  // oneDNN 3 builds primitive descriptors directly; oneDNN 2 from operation descriptors.
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_forward::primitive_desc fwd_pd(
      eng, dnnl::prop_kind::forward_training, algo, xm, wany, ym, st, dl, pl, pr, attr);
  auto bwd_data_pd = [&] {
    return dnnl::convolution_backward_data::primitive_desc(eng, algo, xm, wany, ym, st, dl, pl, pr,
                                                           fwd_pd, attr);
  };
  auto bwd_weights_pd = [&] {
    return dnnl::convolution_backward_weights::primitive_desc(eng, algo, xm, wany, ym, st, dl,
                                                              pl, pr, fwd_pd, attr);
  };
#else
  dnnl::convolution_forward::primitive_desc fwd_pd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, xm, wany, ym,
                                      st, dl, pl, pr),
      attr, eng);
  auto bwd_data_pd = [&] {
    return dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(algo, xm, wany, ym, st, dl, pl, pr), attr, eng,
        fwd_pd);
  };
  auto bwd_weights_pd = [&] {
    return dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(algo, xm, wany, ym, st, dl, pl, pr), attr, eng,
        fwd_pd);
  };
#endif
  auto conv = std::make_unique<Conv>();
  memory::desc w_md, scratch_md;
  // The primitive of ``pd``, its (diff) weights layout, and its activations ``a``, ``b``.
  auto finish = [&](auto prim, const auto& pd, const memory::desc& w,
                    const memory::desc& a, const memory::desc& b) {
    conv->prim = prim;
    w_md = w;
    scratch_md = pd.scratchpad_desc();
    conv->act_a = memory(a, eng, nullptr);
    conv->act_b = memory(b, eng, nullptr);
  };
  if (kind == kFwd) {
    finish(dnnl::convolution_forward(fwd_pd), fwd_pd, fwd_pd.weights_desc(), xm, ym);
  } else if (kind == kBwdData) {
    auto pd = bwd_data_pd();
    finish(dnnl::convolution_backward_data(pd), pd, pd.weights_desc(), ym, xm);
  } else {
    auto pd = bwd_weights_pd();
    finish(dnnl::convolution_backward_weights(pd), pd, pd.diff_weights_desc(), xm, ym);
  }
  conv->user_w = memory(wuser, eng, nullptr);
  conv->reorder_w = w_md != wuser;
  if (conv->reorder_w) {
    conv->w_buffer.resize(w_md.get_size());
    conv->prim_w = memory(w_md, eng, conv->w_buffer.data());
    conv->w_reorder = kind == kBwdWeights ? dnnl::reorder(conv->prim_w, conv->user_w)
                                          : dnnl::reorder(conv->user_w, conv->prim_w);
  } else {
    conv->prim_w = memory(wuser, eng, nullptr);
  }
  conv->scratch.resize(scratch_md.get_size());
  conv->scratchpad = memory(scratch_md, eng, conv->scratch.data());
  return conv;
}

Conv& Get(const Key& key) {
  thread_local std::map<Key, std::unique_ptr<Conv>> cache;
  auto& slot = cache[key];
  if (!slot) slot = Make(key);
  return *slot;
}

// Runs one convolution; ``a`` and ``b`` are the activations in the order of Conv::act_*.
// Every exception (oneDNN's, bad_alloc from the caches) becomes an error of the call: one
// escaping an FFI handler would abort the process.
ffi::Error Run(Kind kind, const ffi::Span<const int64_t> x_dims,
               const ffi::Span<const int64_t> w_dims, const ffi::Span<const int64_t> y_dims,
               void* a, void* b, void* w, int64_t stride, int64_t pad, int64_t groups,
               int64_t dilation, int64_t threads) noexcept {
  try {
    if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4)
      return ffi::Error::InvalidArgument("jaxnas oneDNN conv: operands must be rank 4");
    if (stride < 1 || pad < 0 || threads < 1 || groups < 1 || dilation < 1)
      return ffi::Error::InvalidArgument(
          "jaxnas oneDNN conv: needs stride >= 1, pad >= 0, groups >= 1, dilation >= 1 and "
          "threads >= 1");
    if (x_dims[3] % groups || w_dims[3] % groups || w_dims[2] * groups != x_dims[3])
      return ffi::Error::InvalidArgument(
          "jaxnas oneDNN conv: channels do not split into the groups");
    Key key{kind,      x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[3],
            w_dims[0], stride,    pad,       y_dims[1], y_dims[2], groups, dilation};
    Conv& conv = Get(key);
    omp_set_num_threads(static_cast<int>(threads));
    thread_local dnnl::stream stream(Engine());
    conv.act_a.set_data_handle(a);
    conv.act_b.set_data_handle(b);
    conv.user_w.set_data_handle(w);
    if (!conv.reorder_w) conv.prim_w.set_data_handle(w);
    if (conv.reorder_w && kind != kBwdWeights)
      conv.w_reorder.execute(stream, conv.user_w, conv.prim_w);
    if (kind == kFwd) {
      conv.prim.execute(stream, {{DNNL_ARG_SRC, conv.act_a}, {DNNL_ARG_WEIGHTS, conv.prim_w},
                                 {DNNL_ARG_DST, conv.act_b},
                                 {DNNL_ARG_SCRATCHPAD, conv.scratchpad}});
    } else if (kind == kBwdData) {
      conv.prim.execute(stream, {{DNNL_ARG_DIFF_DST, conv.act_a},
                                 {DNNL_ARG_WEIGHTS, conv.prim_w},
                                 {DNNL_ARG_DIFF_SRC, conv.act_b},
                                 {DNNL_ARG_SCRATCHPAD, conv.scratchpad}});
    } else {
      conv.prim.execute(stream, {{DNNL_ARG_SRC, conv.act_a}, {DNNL_ARG_DIFF_DST, conv.act_b},
                                 {DNNL_ARG_DIFF_WEIGHTS, conv.prim_w},
                                 {DNNL_ARG_SCRATCHPAD, conv.scratchpad}});
      if (conv.reorder_w) conv.w_reorder.execute(stream, conv.prim_w, conv.user_w);
    }
    stream.wait();
  } catch (const std::exception& e) {  // dnnl::error is one
    return ffi::Error::Internal(std::string("jaxnas oneDNN conv: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("jaxnas oneDNN conv: unknown C++ exception");
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error ConvFwd(F32 x, F32 w, F32Out y, int64_t stride, int64_t pad, int64_t groups,
                   int64_t dilation, int64_t threads) {
  return Run(kFwd, x.dimensions(), w.dimensions(), y->dimensions(), x.untyped_data(),
             y->untyped_data(), w.untyped_data(), stride, pad, groups, dilation, threads);
}

ffi::Error ConvBwdData(F32 g, F32 w, F32Out dx, int64_t stride, int64_t pad, int64_t groups,
                       int64_t dilation, int64_t threads) {
  return Run(kBwdData, dx->dimensions(), w.dimensions(), g.dimensions(), g.untyped_data(),
             dx->untyped_data(), w.untyped_data(), stride, pad, groups, dilation, threads);
}

ffi::Error ConvBwdWeights(F32 x, F32 g, F32Out dw, int64_t stride, int64_t pad,
                          int64_t groups, int64_t dilation, int64_t threads) {
  return Run(kBwdWeights, x.dimensions(), dw->dimensions(), g.dimensions(), x.untyped_data(),
             g.untyped_data(), dw->untyped_data(), stride, pad, groups, dilation, threads);
}

}  // namespace

#define JAXNAS_CONV_BINDING                                                          \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("stride").Attr<int64_t>( \
      "pad").Attr<int64_t>("groups").Attr<int64_t>("dilation").Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnasOnednnConvFwd, ConvFwd, JAXNAS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnasOnednnConvBwdData, ConvBwdData, JAXNAS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnasOnednnConvBwdWeights, ConvBwdWeights,
                              JAXNAS_CONV_BINDING);
