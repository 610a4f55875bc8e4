// Operator schemas of the fused_imbalance extension (fused_imbalance._C), declared once;
// the CPU kernels register in csrc/cpu/, the CUDA kernels in csrc/cuda/.
//
// The Triton ops live in the same namespace but are defined from Python with
// torch.library, which always opens a FRAGMENT; a single TORCH_LIBRARY definition here
// coexists with those in either import order.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/loss_kernels.h"

extern "C" {
// `import fused_imbalance._C` loads this shared library so that the static initialisers
// below register the ops; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_imbalance, m) {
  // The fused loss ops of fused_imbalance/ops/__init__.py. They mutate no argument (the
  // confusion counts are an output), so autograd registers through the public
  // torch.library.register_autograd.
  m.def(
      "cpp_loss_fwd(Tensor x, Tensor target, int loss_mode, float gamma, Tensor? tvals, "
      "int ignore_index, bool need_pixel_loss, bool need_tp, bool need_confusion) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_loss_bwd(Tensor x, Tensor target, Tensor? grad_pixel, Tensor? grad_class, "
      "int loss_mode, float gamma, Tensor? tvals, int ignore_index) -> Tensor");
  // Per-class statistics alone (count, tp, bad and, when asked, this pass's (C, C) confusion
  // counts): the argmax pass of a metric, on CPU and, when built with CUDA, on the GPU.
  m.def(
      "cpp_class_stats(Tensor x, Tensor target, int ignore_index, bool need_confusion) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The loss of low-resolution logits x (B, C, h, w) against labels target (B, H, W): that of
  // F.interpolate(x, size=(H, W), mode, align_corners) without the interpolated tensor.
  // interp: 0 nearest, 1 bilinear. Outputs and flags as cpp_loss_fwd's, plus lse: with need_lse
  // and the softmax focal mode, the log-sum-exp of each pixel's interpolated logits (B·H·W,),
  // which the backward takes (lse) in place of recomputing it; else (0,).
  m.def(
      "cpp_upsample_loss_fwd(Tensor x, Tensor target, int interp, bool align_corners, int loss_mode, "
      "float gamma, Tensor? tvals, int ignore_index, bool need_pixel_loss, bool need_tp, "
      "bool need_confusion, bool need_lse=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_upsample_loss_bwd(Tensor x, Tensor target, Tensor? grad_pixel, Tensor? grad_class, "
      "int interp, bool align_corners, int loss_mode, float gamma, Tensor? tvals, int ignore_index, "
      "Tensor? lse=None) -> Tensor");
  m.def("cpp_select_kth(Tensor values, Tensor k, Tensor? first_hist=None) -> Tensor");
  // Which instruction-set copy of the CPU kernels runs here: "base", "avx2" or "avx512".
  m.def("cpp_cpu_isa() -> str",
        []() { return std::string(fused_imbalance::cpu::cpu_isa_name()); });
}
