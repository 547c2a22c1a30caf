"""Tensor names and layouts: moetron's DeepSeekV3 state dict <-> the published DeepSeek-V3 checkpoint.

moetron (no `model.` prefix, stacked experts)         published / transformers
embed_tokens.weight                                   model.embed_tokens.weight
layers.{i}.<block>                                    model.layers.{i}.<block>
layers.{i}.mlp.experts.gate_up_proj [E, 2I, H]        model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I, H]
                                                      model.layers.{i}.mlp.experts.{e}.up_proj.weight   [I, H]
                                                      (or fused: model.layers.{i}.mlp.experts.gate_up_proj)
layers.{i}.mlp.experts.down_proj [E, H, I]            model.layers.{i}.mlp.experts.{e}.down_proj.weight [H, I]
norm.weight, lm_head.weight                           model.norm.weight, lm_head.weight
mtp.{k}.enorm / hnorm                                 model.layers.{L+k}.enorm / hnorm            (L = num_hidden_layers)
mtp.{k}.eh_proj.weight  acting on [hnorm(h); enorm(e)] model.layers.{L+k}.eh_proj.weight acting on [enorm(e); hnorm(h)]
mtp.{k}.block.<block>                                 model.layers.{L+k}.<block>
mtp.{k}.norm.weight                                   model.layers.{L+k}.shared_head.norm.weight
(the shared lm_head / embedding)                      model.layers.{L+k}.shared_head.head.weight / embed_tokens.weight
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

from moetron.config import ConfigError, ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def mtp_prefix(cfg: ModelConfig, k: int) -> str:
    return f"model.layers.{cfg.num_hidden_layers + k}."


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """eh_proj [H, 2H]: swap the column blocks acting on the two concatenated inputs (its own inverse)."""
    first, second = weight.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


# --------------------------------------------------------------------------------------------- export
def _block_to_hf(prefix: str, rest: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if rest == GATE_UP:
        gate, up = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}mlp.experts.{e}.gate_proj.weight", gate[e]
            yield f"{prefix}mlp.experts.{e}.up_proj.weight", up[e]
    elif rest == DOWN:
        for e in range(tensor.shape[0]):
            yield f"{prefix}mlp.experts.{e}.down_proj.weight", tensor[e]
    else:
        yield prefix + rest, tensor


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(published name, tensor) for every tensor of a moetron state dict; tensors may be views into `state`."""
    for name, tensor in state.items():
        if name in ("embed_tokens.weight", "norm.weight"):
            yield f"model.{name}", tensor
        elif name == "lm_head.weight":
            yield name, tensor
        elif m := _LAYER.match(name):
            yield from _block_to_hf(f"model.layers.{m[1]}.", m[2], tensor)
        elif m := _MTP.match(name):
            prefix, rest = mtp_prefix(cfg, int(m[1])), m[2]
            if rest.startswith("block."):
                yield from _block_to_hf(prefix, rest[len("block."):], tensor)
            elif rest == "eh_proj.weight":
                yield prefix + rest, swap_halves(tensor)
            elif rest == "norm.weight":
                yield prefix + "shared_head.norm.weight", tensor
                # The published layout repeats the shared head and embedding inside every MTP layer.
                yield prefix + "shared_head.head.weight", state["lm_head.weight"]
                yield prefix + "embed_tokens.weight", state["embed_tokens.weight"]
            else:
                yield prefix + rest, tensor
        else:
            raise KeyError(f"no published name for moetron tensor {name!r}")


# --------------------------------------------------------------------------------------------- import
class TensorSource(Protocol):
    where: str  # the directory, for messages

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...  # FP32


def _missing(source: TensorSource, name: str, why: str = "") -> ConfigError:
    return ConfigError(
        f"Tensor `{name}` is missing from {source.where}{why}. Valid: a DeepSeek-V3 checkpoint in the published "
        "layout (per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight` or transformers' fused "
        "`mlp.experts.gate_up_proj`/`down_proj`) whose config.json matches its tensors."
    )


def _check_shape(source: TensorSource, name: str, shape, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise ConfigError(
            f"Tensor `{name}` in {source.where} has shape {list(shape)}, but config.json implies "
            f"{list(expected)}. Valid: the shape that matches config.json (check the checkpoint and config.json "
            "belong together)."
        )


class _Reader:
    """Fetches moetron tensors from a source, checking shapes and remembering which names were used."""

    def __init__(self, source: TensorSource, cfg: ModelConfig):
        self.source, self.cfg, self.used = source, cfg, set()
        self.available = source.names()

    def tensor(self, name: str, shape) -> torch.Tensor:
        if name not in self.available:
            raise _missing(self.source, name)
        _check_shape(self.source, name, self.source.shape(name), shape)
        self.used.add(name)
        return self.source.get(name)

    def experts(self, prefix: str, rest: str, shape) -> torch.Tensor:
        """Stacked [E, 2I, H] / [E, H, I] from the fused tensor or from the per-expert ones."""
        fused = prefix + rest
        if fused in self.available:
            return self.tensor(fused, shape)
        num, out, inner = shape
        if rest == GATE_UP:
            half = (out // 2, inner)
            return torch.stack([
                torch.cat([self.tensor(f"{prefix}mlp.experts.{e}.gate_proj.weight", half),
                           self.tensor(f"{prefix}mlp.experts.{e}.up_proj.weight", half)])
                for e in range(num)
            ])
        return torch.stack([self.tensor(f"{prefix}mlp.experts.{e}.down_proj.weight", (out, inner)) for e in range(num)])

    def block(self, prefix: str, rest: str, shape) -> torch.Tensor:
        if rest in (GATE_UP, DOWN):
            return self.experts(prefix, rest, shape)
        return self.tensor(prefix + rest, shape)


def init_like(name: str, shape, cfg: ModelConfig, generator: torch.Generator) -> torch.Tensor:
    """The value DeepSeekV3.init_weights gives a fresh tensor (used for absent MTP modules)."""
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    if len(shape) >= 2:
        return torch.empty(shape).normal_(0.0, cfg.initializer_range, generator=generator)
    return torch.ones(shape)


def from_hf(source: TensorSource, cfg: ModelConfig, expected: Mapping[str, torch.Size],
            tied_embeddings: bool = False, init_missing_mtp: bool = True,
            ignore_mtp_layers: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """moetron's state dict (names and shapes of `expected`, FP32) from a published-layout source.

    Returns the state and notes for the user. An MTP module that is absent altogether (e.g. a model saved by
    transformers, which drops it) is freshly initialized when `init_missing_mtp`, else it is an error.
    `ignore_mtp_layers`: MTP layers beyond cfg.num_nextn_predict_layers are skipped instead of refused."""
    reader = _Reader(source, cfg)
    notes: list[str] = []
    absent_mtp = {
        k for k in range(cfg.num_nextn_predict_layers)
        if not any(n.startswith(mtp_prefix(cfg, k)) for n in reader.available)
    }
    if absent_mtp and not init_missing_mtp:
        k = min(absent_mtp)
        raise _missing(source, mtp_prefix(cfg, k) + "eh_proj.weight",
                       f" (config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers}, but no tensor "
                       f"of MTP layer {cfg.num_hidden_layers + k} is there)")
    generator = torch.Generator().manual_seed(cfg.num_hidden_layers)
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if name in ("embed_tokens.weight", "norm.weight"):
            state[name] = reader.tensor(f"model.{name}", shape)
        elif name == "lm_head.weight":
            if tied_embeddings and name not in reader.available:
                state[name] = reader.tensor("model.embed_tokens.weight", shape).clone()
            else:
                state[name] = reader.tensor(name, shape)
        elif m := _LAYER.match(name):
            state[name] = reader.block(f"model.layers.{m[1]}.", m[2], shape)
        elif m := _MTP.match(name):
            k, rest = int(m[1]), m[2]
            prefix = mtp_prefix(cfg, k)
            if k in absent_mtp:
                state[name] = init_like(name, shape, cfg, generator)
            elif rest.startswith("block."):
                state[name] = reader.block(prefix, rest[len("block."):], shape)
            elif rest == "eh_proj.weight":
                state[name] = swap_halves(reader.tensor(prefix + rest, shape))
            elif rest == "norm.weight":
                state[name] = reader.tensor(prefix + "shared_head.norm.weight", shape)
            else:
                state[name] = reader.tensor(prefix + rest, shape)
        else:
            raise KeyError(f"no published name for moetron tensor {name!r}")
    for k in sorted(absent_mtp):
        notes.append(f"MTP layer {cfg.num_hidden_layers + k} is not in {source.where} (transformers' save_pretrained "
                     f"drops it); MTP module {k} starts from a fresh initialization.")

    # Copies of shared tensors, rotary caches and FP8 scales are expected extras; anything else means a mismatch.
    ignorable = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$|^model\.layers\.\d+\.(shared_head\.head|embed_tokens)\.weight$")
    first_extra = cfg.num_hidden_layers + cfg.num_nextn_predict_layers

    def extra_mtp(n: str) -> bool:  # MTP layers the caller chose not to import
        m = re.match(r"^model\.layers\.(\d+)\.", n)
        return ignore_mtp_layers and m is not None and int(m[1]) >= first_extra

    unexpected = sorted(n for n in reader.available - reader.used if not ignorable.search(n) and not extra_mtp(n))
    if unexpected:
        shown = ", ".join(f"`{n}`" for n in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise ConfigError(
            f"{source.where} holds {len(unexpected)} tensor(s) this config.json does not explain: {shown}. Valid: "
            "exactly the tensors of a DeepSeek-V3 model with the shapes and layer/expert/MTP counts of config.json."
        )
    return state, notes
