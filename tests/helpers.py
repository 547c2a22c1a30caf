"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import json
import random
from contextlib import contextmanager

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
