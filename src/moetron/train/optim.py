"""AdamW with FP32 master weights and low-precision (BF16) moments (arXiv 2412.19437 §3.3, §4.2).

`adamw_update` is the update of one flat ZeRO-1 shard (train/zero.py: masters and moments of this rank's
shard only). `MasterAdamW` is the same update as a torch optimizer over whole FP32 parameters (the
reference the shard update is tested against). Moments are stored in `moment_dtype`; updates run in FP32.
"""

import torch

from moetron.config import OptimConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class MasterAdamW(torch.optim.Optimizer):
    def __init__(self, named_params, cfg: OptimConfig):
        decay, no_decay = [], []
        for _, param in named_params:
            if param.requires_grad:  # no weight decay for vectors (norm weights), as Megatron does
                (decay if param.dim() >= 2 else no_decay).append(param)
        defaults = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], defaults)
        self.moment_dtype = DTYPES[cfg.moment_dtype]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.moment_dtype)
                state["step"] += 1
                t = float(state["step"])
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(exp_avg / (1 - beta1**t), denom, value=-group["lr"])
                state["exp_avg"] = exp_avg.to(self.moment_dtype)
                state["exp_avg_sq"] = exp_avg_sq.to(self.moment_dtype)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # torch casts the moments to the parameter dtype: undo that
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)


@torch.no_grad()
def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 decay: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 step: float) -> None:
    """MasterAdamW's update of one flat shard, in place: FP32 `master` and `grad`, moments stored in their own
    dtype (BF16), computed in FP32; weight decay where the boolean `decay` is set (matrices, not vectors)."""
    beta1, beta2 = betas
    m = exp_avg.float().mul_(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    if weight_decay:
        master.mul_(torch.where(decay, 1 - lr * weight_decay, 1.0))
    master.addcdiv_(m / (1 - beta1**step), denom, value=-lr)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
