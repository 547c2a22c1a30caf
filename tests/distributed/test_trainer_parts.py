"""Pieces of the distributed trainer that need no processes: the stage split (a single stage holding the
whole model computes exactly the model's losses and gradients), selective recompute (same gradients,
bitwise), the DP/EP-across-nodes rank order, and the ZeRO-1 shards' pieces."""

from __future__ import annotations

import torch
from helpers import small_model_config
from moetron.parallel.mesh import MeshLayout

from moetron.model import DeepSeekV3
from moetron.model.stages import apply_selective_recompute, layer_ranges, split_stages
from moetron.train.zero import Bucket, ShardGroup


def _model_and_batch():
    torch.manual_seed(0)
    model = DeepSeekV3(small_model_config())
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _stage_losses(stage, tokens):
    out = stage(tokens[:, :-1])
    lm, mtp = out.stage.losses(out.hidden, tokens[:, :-1], tokens[:, 1:], 0.3)
    (lm + mtp).backward()
    return lm, mtp


def test_one_stage_equals_the_model_bitwise():
    model, tokens = _model_and_batch()
    stage = split_stages(model, 1, [0])[0]
    ref = model(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.3)
    ref.loss.backward()
    lm, mtp = _stage_losses(stage, tokens)
    assert torch.equal(lm, ref.lm_loss) and torch.equal(mtp, ref.mtp_loss)
    want, got = _grads(model), _grads(stage)
    assert set(got) == set(want)  # names are the full model's
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_last_stage_shares_the_embedding_parameter():
    model, _ = _model_and_batch()
    stages = split_stages(model, 2, [0, 1])
    assert stages[1].embed_tokens.weight is stages[0].embed_tokens.weight
    assert [list(r) for r in layer_ranges(3, 2)] == [[0, 1], [2]]


def test_selective_recompute_gives_the_same_gradients():
    model, tokens = _model_and_batch()
    plain = split_stages(model, 1, [0])[0]
    recomputed = split_stages(model, 1, [0])[0]
    assert apply_selective_recompute(recomputed) > 0
    a, b = _stage_losses(plain, tokens), _stage_losses(recomputed, tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want, got = _grads(plain), _grads(recomputed)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_pp_inner_rank_order_puts_ep_across_nodes():
    layout = MeshLayout(world_size=4, ranks_per_node=2, pp=2, ep=2, order="tp-pp-dp")
    assert layout.pp_groups() == [[0, 1], [2, 3]]  # a pipeline inside a node
    assert layout.ep_groups() == [[0, 2], [1, 3]]  # EP across the two nodes
    assert all(layout.coords(r)["pp"] == r % 2 for r in range(4))
    default = MeshLayout(world_size=4, ranks_per_node=2, pp=2, ep=2)
    assert default.ep_groups() == [[0, 1], [2, 3]]


def test_zero_shards_cover_every_element_once_and_name_experts_by_global_id():
    params = [("a", torch.nn.Parameter(torch.zeros(2, 3))), ("s", torch.nn.Parameter(torch.zeros(3, 2, 2))),
              ("v", torch.nn.Parameter(torch.zeros(5)))]
    group = ShardGroup([0, 1, 2], None, params, expert_offsets={"s": 6})  # rows of `s` are experts 6, 7, 8
    buckets = [Bucket(params, group, rank, True, torch.bfloat16) for rank in range(3)]
    assert buckets[0].shard == 8 and buckets[0].grad.numel() == 24  # 23 elements padded to 3 x 8
    covered: dict[str, list[tuple[int, int]]] = {}
    for bucket in buckets:
        for piece in bucket.pieces():
            covered.setdefault(piece.key, []).append((piece.offset, piece.stop - piece.start))
    lengths = {"a": 6, "s.6": 4, "s.7": 4, "s.8": 4, "v": 5}
    assert set(covered) == set(lengths)
    for key, chunks in covered.items():  # contiguous, no overlap, the whole key
        chunks.sort()
        assert chunks[0][0] == 0 and sum(n for _, n in chunks) == lengths[key], (key, chunks)
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(chunks, chunks[1:])), (key, chunks)
    # weight decay for matrices and expert stacks, not for the vector
    assert buckets[2].decay.tolist() == [True] * 2 + [False] * 6  # elements 16, 17 of `s`, then `v`, padding
