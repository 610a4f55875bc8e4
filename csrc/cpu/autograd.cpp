// The C++ backend's eager autograd node: the forward runs a loss's forward op, the backward its backward
// op with the upstream gradient, with no Python in either. One node, three calls: the plain and upsampled
// losses (fused_imbalance/_fused.py; RecallLoss's moving average included), the Dice family
// (fused_imbalance/_dice.py) and the OHEM cross-entropy (fused_imbalance/_ohem.py). Each is the formula
// of that module's Python _Eager, calling the same functions, so the two give bit-identical results.
// Forward-mode derivatives, torch.func and torch.compile take the Python paths.
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

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
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_dice_fwd_cpu(
    const Tensor& x, const Tensor& target, const OptTensor& weight, const OptTensor& ce_weight,
    const OptTensor& confusion, int64_t kind, int64_t w_type, int64_t flags, at::ArrayRef<double> params,
    int64_t ignore_index, int64_t reduction, bool validate, bool finalize);
Tensor cpp_dice_bwd_cpu(const Tensor& x, const Tensor& target, const Tensor& coef, const OptTensor& ce_scale,
                        const Tensor& grad, int64_t kind, int64_t flags, int64_t ignore_index, int64_t reduction);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_ohem_fwd_cpu(
    const Tensor& x, const Tensor& target, int64_t interp, bool align_corners, const OptTensor& weight,
    const OptTensor& confusion, double thresh, int64_t rank, int64_t ignore_index, int64_t reduction,
    bool mean_over_all, bool validate, bool need_lse);
Tensor cpp_ohem_bwd_cpu(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                        const OptTensor& grad, const OptTensor& weight, const Tensor& pn, const Tensor& aux,
                        const OptTensor& lse, int64_t ignore_index);

// One call's arguments other than the logits, and what its forward leaves for the backward: the node's
// saved state. ``need_lse``: whether autograd records the call (the forward keeps what its backward may take).
struct Call : torch::CustomClassHolder {
  bool need_lse = false;
  virtual Tensor forward(const Tensor& x) = 0;
  virtual Tensor backward(const Tensor& x, const Tensor& grad_loss) const = 0;
};

// The plain (interp -1) or upsampled loss; its counts, true positives and bad labels are for the caller.
struct LossCall : Call {
  Tensor target;
  OptTensor weight, tvals, confusion;
  int64_t interp = -1;  // -1: the plain loss; else the upsampled one's interpolation
  bool align_corners = false;
  int64_t mode = 0, ignore_index = -100, reduction = 0, weighting = 0;
  double gamma = 0.0;
  bool need_tp = false, validate = true;
  // RecallLoss's moving average (ema): running recall, seen, 1 - momentum, reduction; ema_reduction -1: none
  OptTensor running, seen;
  double ema_weight = 0.0;
  int64_t ema_reduction = -1;
  // the forward's outputs besides the loss
  Tensor scale, count, tp, bad, lse;

  Tensor forward(const Tensor& x) override {
    Tensor loss;
    std::tie(loss, scale, count, tp, bad, lse) =
        interp < 0 ? cpp_loss_fwd_cpu(x, target, weight, tvals, confusion, mode, gamma, ignore_index, reduction,
                                      weighting, need_tp, validate, need_lse)
                   : cpp_upsample_loss_fwd_cpu(x, target, interp, align_corners, weight, tvals, confusion, mode,
                                               gamma, ignore_index, reduction, weighting, need_tp, validate,
                                               need_lse);
    if (ema_reduction >= 0)  // the per-class sums weighted by the moving average: a scalar loss
      std::tie(loss, scale) = recall_ema_cpu(loss, count, tp, *running, *seen, ema_weight, ema_reduction);
    return loss;
  }

  // The backward op for the upstream gradient of the loss (_fused._upstream: the gradient of per-class sums
  // is the factor; a sum or "none" without weights has a factor of 1).
  Tensor backward(const Tensor& x, const Tensor& grad_loss) const override {
    OptTensor grad = grad_loss, sc = scale;
    if (ema_reduction < 0) {
      if (reduction == kClass) {
        grad = std::nullopt;
        sc = grad_loss;
      } else if (reduction != kMean && weighting == kNoWeight) {
        sc = std::nullopt;
      }
    }
    return interp < 0 ? cpp_loss_bwd_cpu(x, target, grad, sc, tvals, lse, mode, gamma, ignore_index)
                      : cpp_upsample_loss_bwd_cpu(x, target, interp, align_corners, grad, sc, tvals, lse, mode,
                                                  gamma, ignore_index);
  }
};

// The Dice family's call with its finalize in the forward (no all-reduce between the pass and it).
struct DiceCall : Call {
  Tensor target;
  OptTensor weight, ce_weight, confusion;
  int64_t kind = 0, w_type = 0, flags = 0, ignore_index = -100, reduction = 0;
  std::vector<double> params;
  bool validate = true;
  Tensor coef, ce_scale;

  Tensor forward(const Tensor& x) override {
    Tensor loss, sums, bad;
    std::tie(loss, sums, coef, ce_scale, bad) = cpp_dice_fwd_cpu(
        x, target, weight, ce_weight, confusion, kind, w_type, flags, params, ignore_index, reduction, validate, true);
    return loss;
  }
  Tensor backward(const Tensor& x, const Tensor& grad_loss) const override {
    const OptTensor ce = ce_scale.numel() ? OptTensor(ce_scale) : std::nullopt;
    return cpp_dice_bwd_cpu(x, target, coef, ce, grad_loss, kind, flags, ignore_index, reduction);
  }
};

// The OHEM cross-entropy (interp -1: the logits at the labels' size).
struct OhemCall : Call {
  Tensor target;
  OptTensor weight, confusion;
  int64_t interp = -1, rank = 0, ignore_index = -100, reduction = 0;
  bool align_corners = false, mean_over_all = false, validate = true;
  double thresh = 0.0;
  Tensor pn, aux, lse;

  Tensor forward(const Tensor& x) override {
    Tensor loss, bad;
    std::tie(loss, pn, aux, bad, lse) = cpp_ohem_fwd_cpu(x, target, interp, align_corners, weight, confusion, thresh,
                                                          rank, ignore_index, reduction, mean_over_all, validate,
                                                          need_lse);
    return loss;
  }
  Tensor backward(const Tensor& x, const Tensor& grad_loss) const override {
    return cpp_ohem_bwd_cpu(x, target, interp, align_corners, grad_loss, weight, pn, aux, lse, ignore_index);
  }
};

using CallPtr = c10::intrusive_ptr<Call>;

namespace {

CallPtr call_of(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<Call>(ctx->saved_data["call"].toCapsule());
}

}  // namespace

// The backward as a differentiable step whose own derivative is an error (create_graph=True would otherwise
// give a gradient silently missing its second-order term), as the Python paths' _Backward.
struct LossBackward : torch::autograd::Function<LossBackward> {
  static Tensor forward(AutogradContext*, const Tensor& x, const Tensor& grad_loss, const CallPtr& call) {
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
    Tensor loss = call->forward(x);
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

namespace {

// The node's forward for ``call``: whether autograd records it decides what the forward keeps.
Tensor run_node(const Tensor& x, const CallPtr& call) {
  call->need_lse = at::GradMode::is_enabled() && x.requires_grad();
  return FusedLoss::apply(x, call);
}

}  // namespace

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
  if (ema_reduction >= 0) {
    TORCH_CHECK(running.has_value() && seen.has_value(), "fused_imbalance: the moving average needs its buffers");
    call->running = running;
    call->seen = seen;
    call->ema_weight = ema_weight;
    call->ema_reduction = ema_reduction;
  }
  Tensor loss = run_node(x, call);
  return {loss, call->count, call->tp, call->bad};
}

// The eager call of a Dice-family loss (finalized in the forward) through the autograd node: the loss.
Tensor cpp_dice_autograd(const Tensor& x, const Tensor& target, const OptTensor& weight, const OptTensor& ce_weight,
                         const OptTensor& confusion, int64_t kind, int64_t w_type, int64_t flags,
                         std::vector<double> params, int64_t ignore_index, int64_t reduction, bool validate) {
  auto call = c10::make_intrusive<DiceCall>();
  call->target = target;
  call->weight = weight;
  call->ce_weight = ce_weight;
  call->confusion = confusion;
  call->kind = kind;
  call->w_type = w_type;
  call->flags = flags;
  call->params = std::move(params);
  call->ignore_index = ignore_index;
  call->reduction = reduction;
  call->validate = validate;
  return run_node(x, call);
}

// The eager call of the OHEM cross-entropy through the autograd node: the loss.
Tensor cpp_ohem_autograd(const Tensor& x, const Tensor& target, int64_t interp, bool align_corners,
                         const OptTensor& weight, const OptTensor& confusion, double thresh, int64_t rank,
                         int64_t ignore_index, int64_t reduction, bool mean_over_all, bool validate) {
  auto call = c10::make_intrusive<OhemCall>();
  call->target = target;
  call->interp = interp;
  call->align_corners = align_corners;
  call->weight = weight;
  call->confusion = confusion;
  call->thresh = thresh;
  call->rank = rank;
  call->ignore_index = ignore_index;
  call->reduction = reduction;
  call->mean_over_all = mean_over_all;
  call->validate = validate;
  return run_node(x, call);
}

}  // namespace cpu
}  // namespace fused_imbalance
