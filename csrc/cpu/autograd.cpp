// The C++ backend's eager autograd node of the plain and the upsampled losses (fused_imbalance/_fused.py):
// the forward runs the forward op (and RecallLoss's moving average when given), the backward calls the
// backward op with the upstream gradient and the per-class factor, with no Python in either. It is the
// same formula as the Python path (_fused._Eager), calling the same functions, so the two give
// bit-identical results. Forward-mode derivatives, torch.func and torch.compile take the Python paths.
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <tuple>

#include "op_common.h"

namespace fused_imbalance {
namespace cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, const OptTensor& weight, const OptTensor& tvals,
    const OptTensor& confusion, int64_t mode, double gamma, int64_t ignore_index, int64_t reduction,
    int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_loss_bwd_cpu(const Tensor& x, const Tensor& target, const OptTensor& grad, const OptTensor& scale,
                        const OptTensor& tvals, const OptTensor& lse, int64_t mode, double gamma,
                        int64_t ignore_index);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpp_upsample_loss_fwd_cpu(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const OptTensor& weight,
    const OptTensor& tvals, const OptTensor& confusion, int64_t mode, double gamma, int64_t ignore_index,
    int64_t reduction, int64_t weighting, bool need_tp, bool validate, bool need_lse);
Tensor cpp_upsample_loss_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                                 const OptTensor& grad, const OptTensor& scale, const OptTensor& tvals,
                                 const OptTensor& lse, int64_t mode, double gamma, int64_t ignore_index);
std::tuple<Tensor, Tensor> recall_ema_cpu(const Tensor& sums, const Tensor& count, const Tensor& tp, Tensor running,
                                          Tensor seen, double weight, int64_t reduction);

// One call's arguments other than the logits, and what its forward leaves for the backward and the caller.
struct LossCall : torch::CustomClassHolder {
  Tensor target;
  OptTensor weight, tvals, confusion;
  int64_t interp = -1;  // -1: the plain loss; else the upsampled one's interpolation
  bool align_corners = false;
  int64_t mode = 0, ignore_index = -100, reduction = 0, weighting = 0;
  double gamma = 0.0;
  bool need_tp = false, validate = true, need_lse = false;
  // RecallLoss's moving average (ema): running recall, seen, 1 - momentum, reduction; ema_reduction -1: none
  OptTensor running, seen;
  double ema_weight = 0.0;
  int64_t ema_reduction = -1;
  // the forward's outputs besides the loss
  Tensor scale, count, tp, bad, lse;

  void forward(const Tensor& x, Tensor& loss) {
    std::tie(loss, scale, count, tp, bad, lse) =
        interp < 0 ? cpp_loss_fwd_cpu(x, target, weight, tvals, confusion, mode, gamma, ignore_index, reduction,
                                      weighting, need_tp, validate, need_lse)
                   : cpp_upsample_loss_fwd_cpu(x, target, interp, align_corners, weight, tvals, confusion, mode,
                                               gamma, ignore_index, reduction, weighting, need_tp, validate,
                                               need_lse);
    if (ema_reduction >= 0)  // the per-class sums weighted by the moving average: a scalar loss
      std::tie(loss, scale) = recall_ema_cpu(loss, count, tp, *running, *seen, ema_weight, ema_reduction);
  }

  // The backward op for the upstream gradient of the loss (_fused._upstream: the gradient of per-class sums
  // is the factor; a sum or "none" without weights has a factor of 1).
  Tensor backward(const Tensor& x, const Tensor& grad_loss) const {
    OptTensor grad = grad_loss, sc = scale;
    if (ema_reduction < 0) {
      if (reduction == kClass) {
        grad = std::nullopt;
        sc = grad_loss;
      } else if (reduction != kMean && weighting == kNoWeight) {
        sc = std::nullopt;
      }
    }
    const OptTensor kept = lse;
    return interp < 0 ? cpp_loss_bwd_cpu(x, target, grad, sc, tvals, kept, mode, gamma, ignore_index)
                      : cpp_upsample_loss_bwd_cpu(x, target, interp, align_corners, grad, sc, tvals, kept, mode,
                                                  gamma, ignore_index);
  }
};

using CallPtr = c10::intrusive_ptr<LossCall>;

namespace {

CallPtr call_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<LossCall>(ctx->saved_data["call"].toCapsule());
}

}  // namespace

// The backward as a differentiable step whose own derivative is an error (create_graph=True would otherwise
// give a gradient silently missing its second-order term), as _fused._Backward.
struct LossBackward : torch::autograd::Function<LossBackward> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& grad_loss, const CallPtr& call) {
    return call->backward(x, grad_loss);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "fused_imbalance: second derivatives of the fused losses are not implemented (the backward of the "
                "'cpp' backend has no derivative); use backend=\"reference\" for double backward, Hessians or "
                "gradient penalties through the loss");
  }
};

struct FusedLoss : torch::autograd::Function<FusedLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const CallPtr& call) {
    Tensor loss;
    call->forward(x, loss);
    ctx->save_for_backward({x});
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const CallPtr call = call_of(ctx);
    Tensor dx = at::GradMode::is_enabled() ? LossBackward::apply(x, grads[0], call) : call->backward(x, grads[0]);
    return {dx, Tensor()};
  }
};

// The eager call of the plain (interp -1) or upsampled loss through the autograd node: (loss, count, tp, bad).
std::tuple<Tensor, Tensor, Tensor, Tensor> cpp_loss_autograd(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const OptTensor& weight,
    const OptTensor& tvals, const OptTensor& confusion, int64_t mode, double gamma, int64_t ignore_index,
    int64_t reduction, int64_t weighting, bool need_tp, bool validate, const OptTensor& running,
    const OptTensor& seen, double ema_weight, int64_t ema_reduction) {
  auto call = c10::make_intrusive<LossCall>();
  call->target = target;
  call->weight = weight;
  call->tvals = tvals;
  call->confusion = confusion;
  call->interp = interp;
  call->align_corners = align_corners;
  call->mode = mode;
  call->gamma = gamma;
  call->ignore_index = ignore_index;
  call->reduction = reduction;
  call->weighting = weighting;
  call->need_tp = need_tp;
  call->validate = validate;
  // whether autograd records the call: the backend keeps what its backward may take (Backend.keeps_lse)
  call->need_lse = at::GradMode::is_enabled() && x.requires_grad();
  if (ema_reduction >= 0) {
    TORCH_CHECK(running.has_value() && seen.has_value(), "fused_imbalance: the moving average needs its buffers");
    call->running = running;
    call->seen = seen;
    call->ema_weight = ema_weight;
    call->ema_reduction = ema_reduction;
  }
  Tensor loss = FusedLoss::apply(x, call);
  return {loss, call->count, call->tp, call->bad};
}

}  // namespace cpu
}  // namespace fused_imbalance
