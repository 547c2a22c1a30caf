"""AdamW with FP32 master weights and low-precision (BF16) moments (arXiv 2412.19437 §4.2).

The model's parameters are the FP32 masters and gradients accumulate in FP32; compute may run in BF16
under autocast. Only the moments are stored in `moment_dtype`; each update is computed in FP32.
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
