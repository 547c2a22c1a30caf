"""Shared fixtures: small model configs and a tiny text corpus, so tests run in seconds on 2 cores."""


import pytest
import torch
import torch.distributed as dist
from helpers import write_corpus

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """Each test starts without a default process group: one left by an in-process trainer or test would
    make the next init_process_group fail and a forked worker deadlock."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)
