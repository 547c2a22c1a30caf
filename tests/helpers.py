"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import importlib.util
import json
import random
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from moetron.config import ModelConfig


@contextmanager
def world_of_one():
    """A single-rank gloo process group for in-process tests; an existing one (a Trainer's) is reused, and only
    a group created here is destroyed here."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_model_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=256,
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def write_corpus(directory) -> dict[str, str]:
    """A small word-salad corpus (train + val JSONL) that a tiny model learns quickly."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven merry ships sail past green hills".split()
    paths = {}
    for split, docs in [("train", 600), ("val", 30)]:
        path = directory / f"{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(docs):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                f.write(json.dumps({"text": text}) + "\n")
        paths[split] = str(path)
    return paths


PHASE_KEYS = ("time_data", "time_forward_backward", "time_optimizer", "time_checkpoint")


def assert_step_metrics(run_dir, world: int) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl and ranks.jsonl of a finished run hold the performance figures, with sane values: the
    phases of a step sum to at most its time, shares lie in [0, 1], per-device throughput is the world's
    share, and ranks.jsonl has one value per rank. Returns both files' records."""
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    ranks = [json.loads(line) for line in open(run_dir / "ranks.jsonl")]
    assert [r["step"] for r in ranks] == [m["step"] for m in metrics]
    for m in metrics:
        assert m["step_time"] > 0 and all(m[k] >= 0 for k in PHASE_KEYS), m
        assert sum(m[k] for k in PHASE_KEYS) <= m["step_time"] * (1 + 1e-4), m  # rounding to 6 digits
        assert m["time_forward_backward"] > 0, m
        assert 0 <= m["ep_wait_share"] <= 1 and 0 <= m["dp_wait_share"] <= 1, m
        assert m["tokens_per_s_per_device"] == _approx(m["tokens_per_s"] / world), m
        assert m["peak_rss_mb"] > 0
    for r in ranks:
        assert all(len(r[k]) == world for k in ("step_time", "ep_wait_share", "dp_wait_share", "peak_rss_mb")), r
        assert all(0 <= v <= 1 for k in ("ep_wait_share", "dp_wait_share") for v in r[k]), r
    last = metrics[-1]
    assert last["time_checkpoint"] > 0  # the final step saves
    assert last["peak_rss_mb"] == _approx(max(ranks[-1]["peak_rss_mb"]))
    return metrics, ranks


def _approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-5)
