"""benchmarks/gpu_check.py --dry-run: the prepared GPU check runs end to end at toy sizes on this machine.

On the CPU the "device" run and the CPU run are the same computation, so their losses must agree exactly
(the comparison itself works); the emulated FP8 GEMM must be close to FP32; every key group is written; the
overlapped pair and the DualPipeV step ran on one device, and the pair's enqueue order holds on the stream model.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["train_steps"] == 2
    assert result["train_max_rel_loss_diff"] == 0.0  # same device twice: bitwise the same run
    assert result["train_last_loss_device"] < result["train_first_loss_device"] + 1.0
    assert 0 < result["fp8_toy_emulated_vs_fp32_diff"] < 1e-2
    assert "fp8_torch_skipped" in result or "fp8_max_torch_vs_emulated_diff" in result
    assert result["grouped_tflops"] > 0 and result["moe_step_ms"] > 0 and 0 < result["moe_mfu"] < 1
    assert result["overlap_pair_sequential_ms"] > 0 and result["overlap_pair_overlapped_ms"] > 0
    assert result["overlap_pair_comm_ms"] > 0 and result["overlap_dualpipev_step_ratio"] > 0
    assert result["overlap_pair_stream_model_crossings"] == 0 and result["overlap_pair_efficiency_stream_model"] > 0.5
