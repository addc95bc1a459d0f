// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers: forward, input gradient and weight gradient
// of an NHWC fp32 convolution with HWIO weights (flax's layouts), one stride and one padding for both axes.
//
// Why: XLA:CPU's convolution kernels, its weight gradient most of all, trail oneDNN's (PyTorch's) on x86 CPUs, and
// their layout changes cost transposes around them (docs/performance.md). jdiff/models/onednn.py builds this file
// on first use and routes jdiff's 3x3 convolutions here on the CPU when it is available.
#include <omp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum class Kind { kForward, kInputGrad, kWeightGrad };

// The shape of one convolution: input [n, h, w, c], weights [kh, kw, c, o], output [n, oh, ow, o].
struct Shape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad_lo, pad_hi, threads;
  auto key() const { return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, stride, pad_lo, pad_hi, threads); }
};

// A primitive ready to run, with the reorders between the caller's HWIO weights and the layout it chose.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;          // the layout the primitive reads or writes its weights in
  memory::desc user_weights;     // HWIO
  bool reorder;                  // weights != user_weights
  dnnl::reorder to_plan, to_user;
  memory::desc scratchpad;       // the working memory it needs, which the caller provides
};

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Creating a primitive JIT-compiles its kernel, so every shape and kind is made once.
std::shared_ptr<Plan> make_plan(Kind kind, const Shape& s) {
  auto& eng = cpu_engine();
  memory::desc src({s.n, s.c, s.h, s.w}, memory::data_type::f32, tag::nhwc);
  memory::desc dst({s.n, s.o, s.oh, s.ow}, memory::data_type::f32, tag::nhwc);
  memory::desc any_weights({s.o, s.c, s.kh, s.kw}, memory::data_type::f32, tag::any);
  memory::dims strides{s.stride, s.stride}, lo{s.pad_lo, s.pad_lo}, hi{s.pad_hi, s.pad_hi};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto prop = kind == Kind::kForward ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
  dnnl::convolution_forward::primitive_desc fwd(eng, prop, dnnl::algorithm::convolution_direct, src, any_weights,
                                                dst, strides, lo, hi, attr);
  auto plan = std::make_shared<Plan>();
  plan->user_weights = memory::desc({s.o, s.c, s.kh, s.kw}, memory::data_type::f32, tag::hwio);
  if (kind == Kind::kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->weights = fwd.weights_desc();
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (kind == Kind::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(eng, dnnl::algorithm::convolution_direct, src, any_weights,
                                                       dst, strides, lo, hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->weights = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(eng, dnnl::algorithm::convolution_direct, src,
                                                          any_weights, dst, strides, lo, hi, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->weights = pd.diff_weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  }
  plan->reorder = plan->weights != plan->user_weights;
  if (plan->reorder) {
    plan->to_plan = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->user_weights, eng, plan->weights));
    plan->to_user = dnnl::reorder(dnnl::reorder::primitive_desc(eng, plan->weights, eng, plan->user_weights));
  }
  return plan;
}

std::shared_ptr<Plan> plan_for(Kind kind, const Shape& s) {
  static std::mutex mutex;
  static std::map<std::pair<int, decltype(s.key())>, std::shared_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[{static_cast<int>(kind), s.key()}];
  if (!plan) plan = make_plan(kind, s);
  return plan;
}

// x [n, h, w, c], weights [kh, kw, c, o], y [n, oh, ow, o]: whichever of the three the kind computes is written.
ffi::Error run(Kind kind, Shape s, float* x, float* weights, float* y) {
  // oneDNN's OpenMP build splits work over omp_get_max_threads() of the calling thread; XLA runs one such thread
  // per CPU device, and jdiff gives each device its share of the cores.
  omp_set_num_threads(static_cast<int>(s.threads));
  try {
    auto plan = plan_for(kind, s);
    auto& eng = cpu_engine();
    dnnl::stream stream(eng);
    memory src({{s.n, s.c, s.h, s.w}, memory::data_type::f32, tag::nhwc}, eng, x);
    memory dst({{s.n, s.o, s.oh, s.ow}, memory::data_type::f32, tag::nhwc}, eng, y);
    memory user_weights(plan->user_weights, eng, weights);
    memory plan_weights = plan->reorder ? memory(plan->weights, eng) : user_weights;
    // Each call its own scratchpad, so devices can run one primitive at once; uninitialised, oneDNN writes it.
    std::unique_ptr<char[]> scratch(new char[plan->scratchpad.get_size()]);
    memory scratchpad(plan->scratchpad, eng, scratch.get());
    if (plan->reorder && kind != Kind::kWeightGrad) plan->to_plan.execute(stream, user_weights, plan_weights);
    if (kind == Kind::kForward) {
      plan->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, plan_weights}, {DNNL_ARG_DST, dst},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else if (kind == Kind::kInputGrad) {
      plan->conv.execute(stream, {{DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WEIGHTS, plan_weights},
                                  {DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      plan->conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, plan_weights}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan->reorder) plan->to_user.execute(stream, plan_weights, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

Shape shape_of(ffi::Span<const int64_t> in, ffi::Span<const int64_t> w, ffi::Span<const int64_t> out,
               int64_t stride, int64_t pad_lo, int64_t pad_hi, int64_t threads) {
  return Shape{in[0], in[1], in[2], in[3], w[0], w[1], w[3], out[1], out[2], stride, pad_lo, pad_hi, threads};
}

ffi::Error forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_lo, int64_t pad_hi,
                   int64_t threads) {
  auto s = shape_of(x.dimensions(), w.dimensions(), y->dimensions(), stride, pad_lo, pad_hi, threads);
  return run(Kind::kForward, s, x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error input_grad(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad_lo,
                      int64_t pad_hi, int64_t threads) {
  auto s = shape_of(dx->dimensions(), w.dimensions(), dy.dimensions(), stride, pad_lo, pad_hi, threads);
  return run(Kind::kInputGrad, s, dx->typed_data(), w.typed_data(), dy.typed_data());
}

ffi::Error weight_grad(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad_lo,
                       int64_t pad_hi, int64_t threads) {
  auto s = shape_of(x.dimensions(), dw->dimensions(), dy.dimensions(), stride, pad_lo, pad_hi, threads);
  return run(Kind::kWeightGrad, s, x.typed_data(), dw->typed_data(), dy.typed_data());
}

auto bind() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_lo")
      .Attr<int64_t>("pad_hi")
      .Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JdiffConvForward, forward, bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdiffConvInputGrad, input_grad, bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JdiffConvWeightGrad, weight_grad, bind());
