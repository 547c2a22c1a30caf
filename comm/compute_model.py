"""A compute model: GEMMs that take as long as they would on a modelled accelerator, the companion of the
link model (comm/link_model.py) for timing overlap on a small CPU machine.

On a GPU the two chunks of an overlapped F&B pair share one compute stream while the transfers run on
their own engines. On a CPU with fewer cores than ranks (4 ranks on 2 cores here), every rank's real
arithmetic competes for the same cores, so the time an overlapped pair takes is bounded by the machine's
cores, not by what the schedule hides. With a compute model attached, every GEMM-bearing module (each
nn.Linear, and each grouped expert module, recognized by its `gate_up_proj` and `down_proj` weights) also
SLEEPS for flops / rate seconds after its forward, and as long again for its input gradients and for its
weight gradients, while its side of an overlapped pair runs (comm/overlap.py), as a busy compute stream
would; with `streams` set, each charge is also recorded as a kernel of the stream model
(comm/stream_model.py). The real arithmetic still runs, so results are unchanged bit for bit; with `rate` well below the machine's own speed the modelled time dominates and the cores stay mostly
free, so the overlap measured is the schedule's.

    model = ComputeModel(flops_per_s=2e9)
    handles = model.attach(stage)       # forward hooks on the stage's GEMM modules
    ...
    for h in handles: h.remove()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .stream_model import StreamRecorder


class _ChargeBackward(torch.autograd.Function):
    """Identity in forward; in backward, sleeps `seconds` before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, seconds: float, sleep):
        ctx.seconds, ctx.sleep = seconds, sleep
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.sleep(ctx.seconds)
        return grad, None, None


def _is_grouped_experts(module: nn.Module) -> bool:
    return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")  # [E, 2I, H] and [E, H, I]


def has_gemms(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_grouped_experts(module)


def gemm_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> float:
    """FLOPs of a module's forward: 2 x rows x in x out per GEMM (0 for modules without GEMMs)."""
    if isinstance(module, nn.Linear):
        return 2.0 * output.numel() * module.in_features
    if _is_grouped_experts(module):
        _, two_inter, hidden = module.gate_up_proj.shape
        return 2.0 * inputs[0].shape[0] * hidden * two_inter * 1.5  # gate+up (2I x H), then down (H x I)
    return 0.0


def _weight_shares(module: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """The weights whose gradient GEMMs make up a module's W, with their share of its FLOPs."""
    if isinstance(module, nn.Linear):
        return [(module.weight, 1.0)]
    return [(module.gate_up_proj, 2 / 3), (module.down_proj, 1 / 3)]


@dataclass
class ComputeModel:
    flops_per_s: float  # the modelled accelerator's achieved rate
    # Other modules to charge, by type: flops(module, inputs, output) of their own forward beyond their child
    # modules' GEMMs (e.g. an attention core), charged after the forward and twice that in backward (B only).
    extra_flops: dict[type, Callable] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep
    modelled_s: float = 0.0  # forward + backward seconds charged so far
    # Where each charge is also recorded as a kernel on the modelled compute stream (comm/stream_model.py).
    streams: StreamRecorder | None = None
    _last: dict = field(default_factory=dict, repr=False)  # module -> seconds of its latest forward

    def __post_init__(self) -> None:
        if not self.flops_per_s > 0:
            raise ValueError(f"ComputeModel.flops_per_s must be positive, got {self.flops_per_s}")

    def attach(self, module: nn.Module) -> list:
        """Charge every GEMM module under `module`: its forward's FLOPs after the forward, as many again for
        the input gradients (B) and for the weight gradients (W), each where autograd computes them, so that
        a backward split into B and W (parallel/weight_grad.py) is charged where each part runs. W is charged
        at the module's latest forward cost (the micro-batches of a step have the same shapes). Returns the
        hook handles (remove them to detach)."""
        handles = []
        for m in module.modules():
            if type(m) in self.extra_flops:
                handles.append(m.register_forward_hook(self._charge_extra))
            if has_gemms(m):
                handles.append(m.register_forward_hook(self._charge))
                for weight, share in _weight_shares(m):
                    handles.append(weight.register_hook(lambda grad, m=m, share=share: self._charge_w(m, share)))
        return handles

    def _charge(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        """A GEMM module's forward: its own time now, as much again in backward for B (W: `_charge_w`)."""
        seconds = gemm_flops(module, inputs, output) / self.flops_per_s
        self._last[module] = seconds
        return self._spend(seconds, output, backward_seconds=seconds, total=3 * seconds)

    def _charge_extra(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        """An `extra_flops` module's forward: its own time now, twice that in backward (no weights)."""
        seconds = self.extra_flops[type(module)](module, inputs, output) / self.flops_per_s
        return self._spend(seconds, output, backward_seconds=2 * seconds, total=3 * seconds)

    def _spend(self, seconds: float, output: torch.Tensor, backward_seconds: float, total: float):
        self.modelled_s += total
        self._run(seconds)
        if output.requires_grad:
            return _ChargeBackward.apply(output, backward_seconds, self._run)
        return output

    def _charge_w(self, module: nn.Module, share: float) -> None:
        self._run(self._last.get(module, 0.0) * share)

    def _run(self, seconds: float) -> None:
        """A modelled kernel: recorded on the stream model (if any), and slept for."""
        if self.streams is not None:
            self.streams.kernel(seconds)
        self.sleep(seconds)
