"""Shared fixtures: small model configs and a tiny text corpus, so tests run in seconds on 2 cores."""

import json
import random

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def corpus(tmp_path):
    """A small word-salad corpus (train + val JSONL) that a tiny model learns quickly."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven merry ships sail past green hills".split()
    paths = {}
    for split, docs in [("train", 600), ("val", 30)]:
        path = tmp_path / f"{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(docs):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
                f.write(json.dumps({"text": text}) + "\n")
        paths[split] = str(path)
    return paths
