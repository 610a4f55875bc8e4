// Operator schemas of the fused_imbalance extension (fused_imbalance._C), declared once; the CPU
// kernels register in csrc/cpu/. The module also exposes the same functions to Python directly:
// an eager call runs them without the dispatcher's Python layers, a torch.compile graph calls the
// registered ops; both run the same code, so they give bit-identical results.
//
// The Triton ops live in the same namespace but are defined from Python with
// torch.library, which always opens a FRAGMENT; a single TORCH_LIBRARY definition here
// coexists with those in either import order.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/loss_kernels.h"

namespace fused_imbalance {
namespace cpu {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight, const std::optional<Tensor>& tvals,
    const std::optional<Tensor>& confusion, int64_t mode, double gamma, int64_t ignore_index, int64_t reduction,
    int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_loss_bwd_cpu(const Tensor& x, const Tensor& target, const std::optional<Tensor>& grad,
                        const std::optional<Tensor>& scale, const std::optional<Tensor>& tvals,
                        const std::optional<Tensor>& lse, int64_t mode, double gamma, int64_t ignore_index);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_upsample_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& tvals, const std::optional<Tensor>& confusion, int64_t mode, double gamma,
    int64_t ignore_index, int64_t reduction, int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_upsample_loss_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                                 const std::optional<Tensor>& grad, const std::optional<Tensor>& scale,
                                 const std::optional<Tensor>& tvals, const std::optional<Tensor>& lse, int64_t mode,
                                 double gamma, int64_t ignore_index);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_ohem_fwd_cpu(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& confusion, double thresh, int64_t rank, int64_t ignore_index, int64_t reduction,
    bool mean_over_all, bool validate, bool need_lse);
Tensor cpp_ohem_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                        const std::optional<Tensor>& grad, const std::optional<Tensor>& weight, const Tensor& pn,
                        const Tensor& aux, const std::optional<Tensor>& lse, int64_t ignore_index);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_dice_fwd_cpu(
    const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight, const std::optional<Tensor>& ce_weight,
    const std::optional<Tensor>& confusion, int64_t kind, int64_t w_type, int64_t flags, at::ArrayRef<double> params,
    int64_t ignore_index, int64_t reduction, bool validate, bool finalize);
std::tuple<Tensor, Tensor, Tensor> cpp_dice_finalize_cpu(const Tensor& sums, const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& ce_weight, int64_t kind,
                                                         int64_t w_type, int64_t flags, at::ArrayRef<double> params,
                                                         int64_t reduction, double grad_scale);
Tensor cpp_dice_bwd_cpu(const Tensor& x, const Tensor& target, const Tensor& coef,
                        const std::optional<Tensor>& ce_scale, const Tensor& grad, int64_t kind, int64_t flags,
                        int64_t ignore_index, int64_t reduction);
std::tuple<Tensor, Tensor, Tensor, Tensor> cpp_loss_autograd(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& tvals, const std::optional<Tensor>& confusion, int64_t mode, double gamma,
    int64_t ignore_index, int64_t reduction, int64_t weighting, bool need_tp, bool validate,
    const std::optional<Tensor>& running, const std::optional<Tensor>& seen, double ema_weight, int64_t ema_reduction);
Tensor cpp_dice_autograd(const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight,
                         const std::optional<Tensor>& ce_weight, const std::optional<Tensor>& confusion, int64_t kind,
                         int64_t w_type, int64_t flags, std::vector<double> params, int64_t ignore_index,
                         int64_t reduction, bool validate);
Tensor cpp_ohem_autograd(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                         const std::optional<Tensor>& weight, const std::optional<Tensor>& confusion, double thresh,
                         int64_t rank, int64_t ignore_index, int64_t reduction, bool mean_over_all, bool validate);
std::tuple<Tensor, Tensor> recall_ema_cpu(const Tensor& sums, const Tensor& count, const Tensor& tp, Tensor running,
                                          Tensor seen, double weight, int64_t reduction);

}  // namespace cpu
}  // namespace fused_imbalance

TORCH_LIBRARY(fused_imbalance, m) {
  // The fused loss ops of fused_imbalance/ops/__init__.py (the contract is documented there). The
  // only argument they mutate is the caller's confusion matrix; autograd is the Python package's.
  m.def(
      "cpp_loss_fwd(Tensor x, Tensor target, Tensor? weight, Tensor? tvals, Tensor(a!)? confusion, int loss_mode, "
      "float gamma, int ignore_index, int reduction, int weighting, bool need_tp, bool validate, bool need_lse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_loss_bwd(Tensor x, Tensor target, Tensor? grad, Tensor? scale, Tensor? tvals, Tensor? lse, "
      "int loss_mode, float gamma, int ignore_index) -> Tensor");
  // The loss of low-resolution logits x (B, C, h, w) against labels target (B, H, W): that of
  // F.interpolate(x, size=(H, W), mode, align_corners) without the interpolated tensor.
  // interp: 0 nearest, 1 bilinear. The rest as the plain ops'; lse: with need_lse and the softmax
  // focal mode, each pixel's log-sum-exp of its interpolated logits (B·H·W,), else (0,).
  m.def(
      "cpp_upsample_loss_fwd(Tensor x, Tensor target, int interp, bool align_corners, Tensor? weight, "
      "Tensor? tvals, Tensor(a!)? confusion, int loss_mode, float gamma, int ignore_index, int reduction, "
      "int weighting, bool need_tp, bool validate, bool need_lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_upsample_loss_bwd(Tensor x, Tensor target, int interp, bool align_corners, Tensor? grad, Tensor? scale, "
      "Tensor? tvals, Tensor? lse, int loss_mode, float gamma, int ignore_index) -> Tensor");
  // The Dice family (csrc/cpu/dice_cpu.cpp; the contract in fused_imbalance/ops/dice.py).
  m.def(
      "cpp_dice_fwd(Tensor x, Tensor target, Tensor? weight, Tensor? ce_weight, Tensor(a!)? confusion, int kind, "
      "int w_type, int flags, float[] params, int ignore_index, int reduction, bool validate, bool finalize) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_dice_finalize(Tensor sums, Tensor? weight, Tensor? ce_weight, int kind, int w_type, int flags, "
      "float[] params, int reduction, float grad_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cpp_dice_bwd(Tensor x, Tensor target, Tensor coef, Tensor? ce_scale, Tensor grad, int kind, int flags, "
      "int ignore_index, int reduction) -> Tensor");
  // The k-th smallest valid entry of values (csrc/cpu/select_cpu.cpp, fused_imbalance/ops/select.py).
  m.def("cpp_select_kth(Tensor values, Tensor k, Tensor? first_hist=None) -> Tensor");
  // The OHEM cross-entropy (csrc/cpu/ohem_cpu.cpp; the contract in fused_imbalance/ops/ohem.py): interp -1
  // for logits of the labels' size, else the upsampled ops' interp; rank clamped to n_valid - 1 on the way.
  // Returns (loss, pn, aux, bad, lse): pn the per-pixel label probabilities the kept set was decided on
  // (-1 where not valid), aux (threshold, the mean's factor), both read by the backward.
  m.def(
      "cpp_ohem_fwd(Tensor x, Tensor target, int interp, bool align_corners, Tensor? weight, Tensor(a!)? confusion, "
      "float thresh, int rank, int ignore_index, int reduction, bool mean_over_all, bool validate, bool need_lse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpp_ohem_bwd(Tensor x, Tensor target, int interp, bool align_corners, Tensor? grad, Tensor? weight, "
      "Tensor pn, Tensor aux, Tensor? lse, int ignore_index) -> Tensor");
  // Which instruction-set copy of the CPU kernels runs here: "base", "avx2" or "avx512".
  m.def("cpp_cpu_isa() -> str",
        []() { return std::string(fused_imbalance::cpu::cpu_isa_name()); });
}

// The eager entry points: the same functions as the ops above, called from Python through pybind11
// (a few hundred nanoseconds) instead of the dispatcher's Python path (several microseconds).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = fused_imbalance::cpu;
  m.def("loss_fwd", &cpu::cpp_loss_fwd_cpu);
  m.def("loss_bwd", &cpu::cpp_loss_bwd_cpu);
  m.def("upsample_loss_fwd", &cpu::cpp_upsample_loss_fwd_cpu);
  m.def("upsample_loss_bwd", &cpu::cpp_upsample_loss_bwd_cpu);
  m.def("ohem_fwd", &cpu::cpp_ohem_fwd_cpu);
  m.def("ohem_bwd", &cpu::cpp_ohem_bwd_cpu);
  // RecallLoss's moving average and loss (eager calls only: a compiled graph traces the module's torch ops)
  m.def("recall_ema", &cpu::recall_ema_cpu);
  // An eager call of the plain (interp -1) or upsampled loss with its autograd node in C++ (csrc/cpu/autograd.cpp):
  // (loss, count, tp, bad). Eager calls only, outside forward-mode AD and torch.func.
  m.def("loss_autograd", &cpu::cpp_loss_autograd);
  // The same node for a Dice-family loss finalized in its forward, and for the OHEM cross-entropy: the loss.
  m.def("dice_autograd", &cpu::cpp_dice_autograd);
  m.def("ohem_autograd", &cpu::cpp_ohem_autograd);
  // float[] params: a Python list arrives as a std::vector (pybind11 has no caster for ArrayRef)
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  m.def("dice_fwd", [](const Tensor& x, const Tensor& target, const OptTensor& weight, const OptTensor& ce_weight,
                       const OptTensor& confusion, int64_t kind, int64_t w_type, int64_t flags,
                       const std::vector<double>& params, int64_t ignore_index, int64_t reduction, bool validate,
                       bool finalize) {
    return cpu::cpp_dice_fwd_cpu(x, target, weight, ce_weight, confusion, kind, w_type, flags, params, ignore_index,
                                 reduction, validate, finalize);
  });
  m.def("dice_finalize", [](const Tensor& sums, const OptTensor& weight, const OptTensor& ce_weight, int64_t kind,
                            int64_t w_type, int64_t flags, const std::vector<double>& params, int64_t reduction,
                            double grad_scale) {
    return cpu::cpp_dice_finalize_cpu(sums, weight, ce_weight, kind, w_type, flags, params, reduction, grad_scale);
  });
  m.def("dice_bwd", &cpu::cpp_dice_bwd_cpu);
}
