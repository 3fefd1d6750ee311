// XLA FFI handlers for 3-D convolutions on oneDNN's CPU primitives: forward, forward + bias
// + ReLU (one pass), input gradient and kernel gradient; and 3-D max pooling with its
// gradient. mlssp_jax/onednn.py compiles this file and registers the handlers.
//
// float32, channels-last like the rest of mlssp_jax: activations (B, D, H, W, C), kernels
// DHWIO (kd, kh, kw, Ci, Co) as flax stores them. oneDNN reads and writes activations in
// that layout (ndhwc) directly; kernels are reordered to the primitive's blocked layout into a
// buffer kept with the primitive, and only when the kernel differs from the last one it
// reordered (inference repeats the same kernels). Convolution attribute ``stride``: 1 = 'SAME' padding (an even kernel gets the
// extra pad at the end, as XLA does); > 1 = 'VALID', output size taken from the buffers.
//
// Forward 3x3x3 convolutions with eight output channels, and the 2x2x2 stride-2 transposed
// convolution (input gradient) to eight channels, go to direct_conv.cc instead (when the
// caller's ``direct`` attribute is 1 and the CPU has AVX-512F).
//
// Primitives are built once per shape and kept. XLA calls handlers from any of its worker
// threads, so every primitive uses a user-managed scratchpad (oneDNN's own is per thread)
// and calls are serialised by one mutex, which also keeps one call's OpenMP team from
// competing with another's: each call already uses every core.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "direct_conv.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;
using S32Out = ffi::ResultBuffer<ffi::S32>;
using Args = std::unordered_map<int, memory>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex& Mutex() {
  static std::mutex mutex;
  return mutex;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Adds the scratchpad (one buffer, grown as needed; callers hold the mutex) and runs.
void Execute(const dnnl::primitive& primitive, const memory::desc& scratchpad, Args args) {
  static void* buffer = nullptr;
  static size_t capacity = 0;
  const size_t bytes = scratchpad.get_size();
  if (bytes > capacity) {
    std::free(buffer);
    capacity = (bytes + 4095) / 4096 * 4096;
    buffer = std::aligned_alloc(4096, capacity);
    if (buffer == nullptr) {
      capacity = 0;
      throw dnnl::error(dnnl_out_of_memory, "scratchpad allocation failed");
    }
  }
  auto& engine = Engine();
  if (bytes > 0) args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, engine, buffer)});
  dnnl::stream stream(engine);
  primitive.execute(stream, args);
  stream.wait();
}

// ------------------------------------------------------------------------- convolution

enum class Pass { kForward, kForwardBiasRelu, kInputGrad, kKernelGrad };

struct ConvPlan {
  dnnl::primitive conv;
  memory::desc src, dst, bias, scratchpad;
  memory::desc weights;       // the primitive's kernel layout
  memory::desc user_weights;  // DHWIO
  memory reordered;           // a kernel buffer in the primitive's layout, when it differs
  std::vector<float> reordered_from;  // the DHWIO kernel ``reordered`` holds (input kernels)
};

// Shape: B, Ci, Co, D, H, W (input), D, H, W (output), kd, kh, kw, stride.
ConvPlan MakeConvPlan(Pass pass, const std::vector<int64_t>& s) {
  const int64_t b = s[0], ci = s[1], co = s[2], stride = s[12];
  const memory::dims in = {s[3], s[4], s[5]}, out = {s[6], s[7], s[8]};
  const memory::dims k = {s[9], s[10], s[11]};
  const auto f32 = memory::data_type::f32;
  ConvPlan plan;
  plan.src = memory::desc({b, ci, in[0], in[1], in[2]}, f32, memory::format_tag::ndhwc);
  plan.dst = memory::desc({b, co, out[0], out[1], out[2]}, f32, memory::format_tag::ndhwc);
  plan.user_weights = memory::desc({co, ci, k[0], k[1], k[2]}, f32, memory::format_tag::dhwio);
  const memory::desc any_w({co, ci, k[0], k[1], k[2]}, f32, memory::format_tag::any);
  memory::dims strides = {stride, stride, stride}, pad_l(3), pad_r(3);
  for (int i = 0; i < 3; ++i) {
    pad_l[i] = stride == 1 ? (k[i] - 1) / 2 : 0;
    pad_r[i] = (out[i] - 1) * stride + k[i] - in[i] - pad_l[i];
  }
  auto& eng = Engine();
  const auto direct = dnnl::algorithm::convolution_direct;
  const auto training = dnnl::prop_kind::forward_training;
  dnnl::primitive_attr attr = UserScratchpad();
  auto fwd = dnnl::convolution_forward::primitive_desc(eng, training, direct, plan.src, any_w,
                                                       plan.dst, strides, pad_l, pad_r, attr);
  if (pass == Pass::kForward) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.weights = fwd.weights_desc();
    plan.scratchpad = fwd.scratchpad_desc();
  } else if (pass == Pass::kForwardBiasRelu) {
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr fused_attr = UserScratchpad();
    fused_attr.set_post_ops(relu);
    plan.bias = memory::desc({co}, f32, memory::format_tag::a);
    auto fused = dnnl::convolution_forward::primitive_desc(
        eng, training, direct, plan.src, any_w, plan.bias, plan.dst, strides, pad_l, pad_r,
        fused_attr);
    plan.conv = dnnl::convolution_forward(fused);
    plan.weights = fused.weights_desc();
    plan.scratchpad = fused.scratchpad_desc();
  } else if (pass == Pass::kInputGrad) {
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        eng, direct, plan.src, any_w, plan.dst, strides, pad_l, pad_r, fwd, attr);
    plan.conv = dnnl::convolution_backward_data(bwd);
    plan.weights = bwd.weights_desc();
    plan.scratchpad = bwd.scratchpad_desc();
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        eng, direct, plan.src, any_w, plan.dst, strides, pad_l, pad_r, fwd, attr);
    plan.conv = dnnl::convolution_backward_weights(bwd);
    plan.weights = bwd.diff_weights_desc();
    plan.scratchpad = bwd.scratchpad_desc();
  }
  if (plan.weights != plan.user_weights) plan.reordered = memory(plan.weights, eng);
  return plan;
}

ConvPlan& GetConvPlan(Pass pass, const std::vector<int64_t>& s) {
  static std::map<std::tuple<Pass, std::vector<int64_t>>, ConvPlan> plans;
  auto key = std::make_tuple(pass, s);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, MakeConvPlan(pass, s)).first;
  return it->second;
}

// The convolution's input x (B, D, H, W, Ci), output y (B, D', H', W', Co), kernel
// (kd, kh, kw, Ci, Co) and, for kForwardBiasRelu only, bias (Co). For the gradients x or
// kernel is the buffer written.
ffi::Error RunConv(Pass pass, float* x, float* kernel, float* y, ffi::Span<const int64_t> xd,
                   ffi::Span<const int64_t> yd, ffi::Span<const int64_t> kd, int64_t stride,
                   float* bias = nullptr, bool direct = false) {
  if (xd.size() != 5 || yd.size() != 5 || kd.size() != 5 || stride < 1) {
    return ffi::Error::InvalidArgument("conv3d: need rank-5 arrays and stride >= 1");
  }
  std::vector<int64_t> s = {xd[0], kd[3], kd[4], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
                            kd[0], kd[1], kd[2], stride};
  std::lock_guard<std::mutex> lock(Mutex());
  const bool forward = pass == Pass::kForward || pass == Pass::kForwardBiasRelu;
  if (direct && forward && mlssp::DirectConvApplies(kd[3], kd[4], kd[0], kd[1], kd[2], stride)) {
    mlssp::DirectConv(x, kernel, bias, pass == Pass::kForwardBiasRelu, y, xd[0], xd[1], xd[2],
                      xd[3], xd[4]);
    return ffi::Error::Success();
  }
  const bool exact_up = yd[1] * 2 == xd[1] && yd[2] * 2 == xd[2] && yd[3] * 2 == xd[3];
  if (direct && pass == Pass::kInputGrad && exact_up &&
      mlssp::DirectUpConvApplies(kd[3], kd[0], kd[1], kd[2], stride)) {
    mlssp::DirectUpConv(y, kernel, x, yd[0], yd[1], yd[2], yd[3], yd[4]);
    return ffi::Error::Success();
  }
  try {
    ConvPlan& plan = GetConvPlan(pass, s);
    auto& eng = Engine();
    memory src(plan.src, eng, x), dst(plan.dst, eng, y);
    memory user_w(plan.user_weights, eng, kernel);
    const bool reorder = plan.weights != plan.user_weights;
    memory w = reorder ? plan.reordered : user_w;
    dnnl::stream stream(eng);
    if (pass == Pass::kKernelGrad) {
      Execute(plan.conv, plan.scratchpad,
              {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst}});
      if (reorder) dnnl::reorder(w, user_w).execute(stream, w, user_w);
    } else {
      // inference calls every primitive with the same kernel again and again: reorder once
      const size_t count = plan.user_weights.get_size() / sizeof(float);
      if (reorder && !(plan.reordered_from.size() == count &&
                       std::memcmp(kernel, plan.reordered_from.data(), count * sizeof(float)) == 0)) {
        dnnl::reorder(user_w, w).execute(stream, user_w, w);
        plan.reordered_from.assign(kernel, kernel + count);
      }
      stream.wait();
      if (pass == Pass::kInputGrad) {
        Execute(plan.conv, plan.scratchpad,
                {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_DST, dst}});
      } else {
        Args args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}};
        if (pass == Pass::kForwardBiasRelu) {
          args.insert({DNNL_ARG_BIAS, memory(plan.bias, eng, bias)});
        }
        Execute(plan.conv, plan.scratchpad, args);
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(F32 x, F32 kernel, F32Out y, int64_t stride, int64_t direct) {
  return RunConv(Pass::kForward, x.typed_data(), kernel.typed_data(), y->typed_data(),
                 x.dimensions(), y->dimensions(), kernel.dimensions(), stride, nullptr,
                 direct == 1);
}

ffi::Error ForwardBiasRelu(F32 x, F32 kernel, F32 bias, F32Out y, int64_t stride,
                           int64_t direct) {
  return RunConv(Pass::kForwardBiasRelu, x.typed_data(), kernel.typed_data(), y->typed_data(),
                 x.dimensions(), y->dimensions(), kernel.dimensions(), stride,
                 bias.typed_data(), direct == 1);
}

ffi::Error InputGrad(F32 dy, F32 kernel, F32Out dx, int64_t stride, int64_t direct) {
  return RunConv(Pass::kInputGrad, dx->typed_data(), kernel.typed_data(), dy.typed_data(),
                 dx->dimensions(), dy.dimensions(), kernel.dimensions(), stride, nullptr,
                 direct == 1);
}

ffi::Error KernelGrad(F32 x, F32 dy, F32Out dkernel, int64_t stride) {
  return RunConv(Pass::kKernelGrad, x.typed_data(), dkernel->typed_data(), dy.typed_data(),
                 x.dimensions(), dy.dimensions(), dkernel->dimensions(), stride);
}

// ------------------------------------------------------------- max pooling (window = stride)

struct PoolPlan {
  dnnl::primitive forward, backward;
  memory::desc src, dst, workspace, forward_scratchpad, backward_scratchpad;
};

// Shape: B, C, D, H, W (input), D, H, W (output), window.
const PoolPlan& GetPoolPlan(const std::vector<int64_t>& s) {
  static std::map<std::vector<int64_t>, PoolPlan> plans;
  auto it = plans.find(s);
  if (it != plans.end()) return it->second;
  const int64_t b = s[0], c = s[1], window = s[8];
  const memory::dims in = {s[2], s[3], s[4]}, out = {s[5], s[6], s[7]};
  const auto f32 = memory::data_type::f32;
  PoolPlan plan;
  plan.src = memory::desc({b, c, in[0], in[1], in[2]}, f32, memory::format_tag::ndhwc);
  plan.dst = memory::desc({b, c, out[0], out[1], out[2]}, f32, memory::format_tag::ndhwc);
  memory::dims kernel(3, window), strides(3, window), dilation(3, 0), pad_l(3, 0), pad_r(3);
  for (int i = 0; i < 3; ++i) pad_r[i] = (out[i] - 1) * window + window - in[i];
  auto& eng = Engine();
  const auto max = dnnl::algorithm::pooling_max;
  auto fwd = dnnl::pooling_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, max, plan.src, plan.dst, strides, kernel,
      dilation, pad_l, pad_r, UserScratchpad());
  auto bwd = dnnl::pooling_backward::primitive_desc(
      eng, max, plan.src, plan.dst, strides, kernel, dilation, pad_l, pad_r, fwd,
      UserScratchpad());
  plan.forward = dnnl::pooling_forward(fwd);
  plan.backward = dnnl::pooling_backward(bwd);
  plan.workspace = fwd.workspace_desc();
  plan.forward_scratchpad = fwd.scratchpad_desc();
  plan.backward_scratchpad = bwd.scratchpad_desc();
  return plans.emplace(s, plan).first->second;
}

// x (B, D, H, W, C) -> y (B, D', H', W', C); workspace: an int32 buffer of y's shape, which
// holds oneDNN's argmax workspace (u8 or s32 per output element; checked). The padding of
// an odd axis ('SAME') is at its end and never wins.
ffi::Error RunPool(bool forward, float* x, float* y, void* workspace, size_t workspace_bytes,
                   ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd, int64_t window) {
  if (xd.size() != 5 || yd.size() != 5 || window < 1) {
    return ffi::Error::InvalidArgument("max_pool: need rank-5 arrays and window >= 1");
  }
  std::vector<int64_t> s = {xd[0], xd[4], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], window};
  std::lock_guard<std::mutex> lock(Mutex());
  try {
    const PoolPlan& plan = GetPoolPlan(s);
    if (plan.workspace.get_size() > workspace_bytes) {
      return ffi::Error::Internal("max_pool: oneDNN's workspace exceeds its buffer");
    }
    auto& eng = Engine();
    memory src(plan.src, eng, x), dst(plan.dst, eng, y), ws(plan.workspace, eng, workspace);
    if (forward) {
      Execute(plan.forward, plan.forward_scratchpad,
              {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_WORKSPACE, ws}});
    } else {
      Execute(plan.backward, plan.backward_scratchpad,
              {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_WORKSPACE, ws}});
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error MaxPool(F32 x, F32Out y, S32Out workspace, int64_t window) {
  return RunPool(true, x.typed_data(), y->typed_data(), workspace->untyped_data(),
                 workspace->size_bytes(), x.dimensions(), y->dimensions(), window);
}

ffi::Error MaxPoolGrad(F32 dy, S32 workspace, F32Out dx, int64_t window) {
  return RunPool(false, dx->typed_data(), dy.typed_data(), workspace.untyped_data(),
                 workspace.size_bytes(), dx->dimensions(), dy.dimensions(), window);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspConv3dForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("direct"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspConv3dForwardBiasRelu, ForwardBiasRelu,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("direct"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspConv3dInputGrad, InputGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride").Attr<int64_t>("direct"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspConv3dKernelGrad, KernelGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  .Attr<int64_t>("stride"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspMaxPool, MaxPool,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Ret<S32>()
                                  .Attr<int64_t>("window"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MlsspMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind().Arg<F32>().Arg<S32>().Ret<F32>()
                                  .Attr<int64_t>("window"));
