"""Typed description of one accelerator and its node (the planner's `hardware` Hydra group)."""

from dataclasses import dataclass

from moetron.config.checks import require_finite
from moetron.config.errors import invalid


@dataclass
class HardwareConfig:
    name: str = "h800"
    gpu_memory_gb: float = 80.0  # usable device memory per rank (GB = 1e9 bytes)
    runtime_overhead_gb: float = 2.0  # CUDA context, allocator fragmentation, library workspaces
    bf16_tflops: float = 989.0  # dense (no sparsity) peak tensor-core TFLOP/s
    fp8_tflops: float = 1979.0
    fp32_tflops: float = 67.0  # non-tensor-core FP32 (what train.precision=fp32 matmuls get)
    achievable_fraction: float = 0.45  # share of peak a large training GEMM reaches in practice
    nvlink_gbps: float = 160.0  # achievable per-GPU intra-node bandwidth, GB/s, one direction
    internode_gbps: float = 50.0  # per-GPU InfiniBand/RoCE bandwidth, GB/s, one direction
    gpus_per_node: int = 8
    comm_sm_fraction: float = 0.15  # share of compute units running communication while overlapped (20/132)
    p2p_latency_us: float = 10.0  # fixed cost of one pipeline transfer on top of its bytes
    op_overhead_us: float = 0.0  # fixed launch/dispatch cost per operator (matters on CPU, ~0 on GPU)

    def validate(self, prefix: str = "hardware") -> "HardwareConfig":
        require_finite(self, prefix)
        for name in ("gpu_memory_gb", "bf16_tflops", "fp8_tflops", "fp32_tflops", "nvlink_gbps", "internode_gbps"):
            if not getattr(self, name) > 0:
                raise invalid(f"{prefix}.{name}", getattr(self, name), "a number > 0")
        for name in ("runtime_overhead_gb", "p2p_latency_us", "op_overhead_us"):
            if not getattr(self, name) >= 0:
                raise invalid(f"{prefix}.{name}", getattr(self, name), "a number >= 0")
        if not 0 < self.achievable_fraction <= 1:
            raise invalid(f"{prefix}.achievable_fraction", self.achievable_fraction, "a fraction in (0, 1]")
        if not 0 <= self.comm_sm_fraction < 1:
            raise invalid(f"{prefix}.comm_sm_fraction", self.comm_sm_fraction, "a fraction in [0, 1)")
        if not self.gpus_per_node >= 1:
            raise invalid(f"{prefix}.gpus_per_node", self.gpus_per_node, "a positive integer")
        return self
