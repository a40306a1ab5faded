// oneDNN 2-D convolutions (float32, NHWC input and output, HWIO kernel) as
// XLA FFI handlers for the CPU: the forward pass, the input gradient and the
// kernel gradient. asga_jax/onednn/conv.py binds them as JAX primitives.
//
// Every call takes its geometry from the buffers' shapes and two attributes:
//   strides = [sh, sw], padding = [top, bottom, left, right] (non-negative).
// Primitives are built once per geometry and pass and kept (oneDNN compiles a
// kernel for each); scratch memory is per calling thread, since XLA may run
// two convolutions at once.

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

enum class Pass : int { kForward, kBackwardData, kBackwardWeights };

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  auto Key(Pass pass) const {
    return std::make_tuple(static_cast<int>(pass), n, h, w, c, kh, kw, o, sh, sw, pt, pb,
                           pl, pr);
  }
  memory::desc Input() const { return memory::desc({n, c, h, w}, kF32, Tag::nhwc); }
  memory::desc Output() const { return memory::desc({n, o, oh, ow}, kF32, Tag::nhwc); }
  memory::desc Kernel(Tag tag) const { return memory::desc({o, c, kh, kw}, kF32, tag); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PaddingL() const { return {pt, pl}; }
  memory::dims PaddingR() const { return {pb, pr}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One pass of one geometry: the primitive, the kernel layout it works in, and
// the reorder between that layout and XLA's HWIO (empty when they agree).
struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel;
  memory::desc scratchpad;
  dnnl::reorder kernel_reorder;
  bool has_reorder = false;
};

dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Input(), g.Kernel(Tag::any), g.Output(), g.Strides(), g.PaddingL(), g.PaddingR(),
      Attributes());
}

// The input- and kernel-gradient passes share the forward pass's geometry and hint.
template <typename BackwardDesc>
BackwardDesc MakeBackwardDesc(const Geometry& g,
                              const dnnl::convolution_forward::primitive_desc& forward) {
  return BackwardDesc(Engine(), dnnl::algorithm::convolution_direct, g.Input(),
                      g.Kernel(Tag::any), g.Output(), g.Strides(), g.PaddingL(), g.PaddingR(),
                      forward, Attributes());
}

Plan MakePlan(const Geometry& g, Pass pass) {
  Plan plan;
  auto forward = ForwardDesc(g);
  const memory::desc hwio = g.Kernel(Tag::hwio);
  if (pass == Pass::kForward) {
    plan.primitive = dnnl::convolution_forward(forward);
    plan.kernel = forward.weights_desc();
    plan.scratchpad = forward.scratchpad_desc();
  } else if (pass == Pass::kBackwardData) {
    auto desc = MakeBackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g, forward);
    plan.primitive = dnnl::convolution_backward_data(desc);
    plan.kernel = desc.weights_desc();
    plan.scratchpad = desc.scratchpad_desc();
  } else {
    auto desc =
        MakeBackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g, forward);
    plan.primitive = dnnl::convolution_backward_weights(desc);
    plan.kernel = desc.diff_weights_desc();
    plan.scratchpad = desc.scratchpad_desc();
  }
  plan.has_reorder = plan.kernel != hwio;
  if (plan.has_reorder) {
    // Forward and input gradient read the kernel; the kernel gradient writes it.
    plan.kernel_reorder = pass == Pass::kBackwardWeights
                              ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                    Engine(), plan.kernel, Engine(), hwio))
                              : dnnl::reorder(dnnl::reorder::primitive_desc(
                                    Engine(), hwio, Engine(), plan.kernel));
  }
  return plan;
}

const Plan& GetPlan(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static std::map<decltype(g.Key(pass)), Plan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = g.Key(pass);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, MakePlan(g, pass)).first;
  return it->second;  // std::map never moves its elements
}

using Dims = ffi::Span<const int64_t>;

ffi::Error MakeGeometry(Dims input, Dims kernel, Dims strides, Dims padding, Geometry* g) {
  if (input.size() != 4 || kernel.size() != 4 || strides.size() != 2 || padding.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "asga_jax oneDNN conv: expects a rank-4 NHWC input, a rank-4 HWIO "
                      "kernel, 2 strides and 4 paddings");
  }
  *g = Geometry{input[0], input[1], input[2], input[3], kernel[0], kernel[1], kernel[3], 0, 0,
                strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
  if (kernel[2] != g->c) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "asga_jax oneDNN conv: kernel input channels differ from the input's");
  }
  g->oh = (g->h + g->pt + g->pb - g->kh) / g->sh + 1;
  g->ow = (g->w + g->pl + g->pr - g->kw) / g->sw + 1;
  return ffi::Error::Success();
}

void* Scratch(std::vector<char>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// Runs `pass`: `input`/`output` are the NHWC activation and output-side
// tensors (x and y, dx and dy, x and dy); `kernel` is XLA's HWIO buffer. The
// geometry comes from the input's and the kernel's shapes.
ffi::Error Run(Pass pass, Dims input_shape, Dims kernel_shape, Dims strides, Dims padding,
               void* input, void* output, void* kernel) {
  Geometry g;
  if (auto e = MakeGeometry(input_shape, kernel_shape, strides, padding, &g); e.failure()) {
    return e;
  }
  try {
    const Plan& plan = GetPlan(g, pass);
    thread_local dnnl::stream stream(Engine());
    thread_local std::vector<char> scratch, kernel_buffer;
    memory user_kernel(g.Kernel(Tag::hwio), Engine(), kernel);
    memory kernel_memory = user_kernel;
    if (plan.has_reorder) {
      kernel_memory = memory(plan.kernel, Engine(),
                             Scratch(kernel_buffer, plan.kernel.get_size()));
      if (pass != Pass::kBackwardWeights) {
        plan.kernel_reorder.execute(stream, user_kernel, kernel_memory);
      }
    }
    memory scratchpad(plan.scratchpad, Engine(), Scratch(scratch, plan.scratchpad.get_size()));
    memory in(g.Input(), Engine(), input);
    memory out(g.Output(), Engine(), output);
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (pass == Pass::kForward) {
      args.insert({{DNNL_ARG_SRC, in}, {DNNL_ARG_WEIGHTS, kernel_memory}, {DNNL_ARG_DST, out}});
    } else if (pass == Pass::kBackwardData) {
      args.insert(
          {{DNNL_ARG_DIFF_SRC, in}, {DNNL_ARG_WEIGHTS, kernel_memory}, {DNNL_ARG_DIFF_DST, out}});
    } else {
      args.insert(
          {{DNNL_ARG_SRC, in}, {DNNL_ARG_DIFF_WEIGHTS, kernel_memory}, {DNNL_ARG_DIFF_DST, out}});
    }
    plan.primitive.execute(stream, args);
    if (plan.has_reorder && pass == Pass::kBackwardWeights) {
      plan.kernel_reorder.execute(stream, kernel_memory, user_kernel);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("asga_jax oneDNN conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 kernel, ffi::ResultBuffer<ffi::F32> y, Dims strides,
                   Dims padding) {
  return Run(Pass::kForward, x.dimensions(), kernel.dimensions(), strides, padding,
             x.untyped_data(), y->untyped_data(), kernel.untyped_data());
}

// The result dx has x's shape, which dy alone does not determine.
ffi::Error BackwardData(F32 dy, F32 kernel, ffi::ResultBuffer<ffi::F32> dx, Dims strides,
                        Dims padding) {
  return Run(Pass::kBackwardData, dx->dimensions(), kernel.dimensions(), strides, padding,
             dx->untyped_data(), dy.untyped_data(), kernel.untyped_data());
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dkernel, Dims strides,
                           Dims padding) {
  return Run(Pass::kBackwardWeights, x.dimensions(), dkernel->dimensions(), strides, padding,
             x.untyped_data(), dy.untyped_data(), dkernel->untyped_data());
}

auto Binding() {
  return ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<Dims>("strides").Attr<Dims>(
      "padding");
}

}  // namespace

// Every pass: two float32 operands, one result, the strides and paddings.
XLA_FFI_DEFINE_HANDLER_SYMBOL(AsgaOnednnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AsgaOnednnConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AsgaOnednnConvBackwardWeights, BackwardWeights, Binding());
