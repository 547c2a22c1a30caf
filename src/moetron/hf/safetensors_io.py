"""Reading and writing Hugging Face safetensors directories (one file or shards + model.safetensors.index.json)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetron.config import ConfigError
from moetron.device import HOST

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = _SIZE.match(str(text))
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"Invalid value for `--max-shard-size`: {text!r}. Valid: a positive size such as 5GB, "
                          "500MB, 2GiB or a number of bytes.")
    return int(float(m[1]) * _UNITS[(m[2] or "B").upper()])


class SafetensorsDir:
    """The tensors of a HF model directory, read lazily; FP8 block-quantized weights are dequantized to FP32."""

    def __init__(self, path: Path, fp8_block: tuple[int, int] = (128, 128)):
        self.path, self.where, self.fp8_block = path, str(path), fp8_block
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}). Valid: "
                                  'a JSON object with a "weight_map" from tensor names to shard file names.') from err
            for name in files:
                if not (path / name).is_file():
                    raise ConfigError(f"Shard `{name}` listed in {index} is missing from {path}. Valid: every file "
                                      "named in the index present next to it.")
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"No safetensors weights in {path}. Valid: a directory with `{SINGLE}`, or shards "
                              f"listed in `{INDEX}`.")
        self._handles, self._file_of = {}, {}
        for name in files:
            try:
                handle = safe_open(str(path / name), framework="pt", device=str(HOST))  # read into host memory
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types for truncated or foreign files
                raise ConfigError(f"{path / name} is not a readable safetensors file ({type(err).__name__}: {err}). "
                                  "Valid: a complete file written by safetensors (re-download or re-export it).") from err
            self._handles[name] = handle
            for key in keys:
                self._file_of[key] = name

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def _raw(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise ConfigError(f"Tensor `{name}` in {self.path / file} cannot be read ({type(err).__name__}: {err}). "
                              "Valid: a complete safetensors file (re-download or re-export it).") from err

    def get(self, name: str) -> torch.Tensor:
        tensor = self._raw(name)
        if tensor.dtype in FP8_DTYPES:
            scale_name = f"{name}_scale_inv"
            if scale_name not in self._file_of:
                raise ConfigError(f"Tensor `{name}` in {self.path} is FP8 but `{scale_name}` is missing. Valid: FP8 "
                                  "weights with their block scales, as in the published DeepSeek-V3 checkpoint.")
            return dequantize_fp8(tensor, self._raw(scale_name), self.fp8_block)
        return tensor.float()


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w = q * s per [block0 x block1] tile, the published checkpoint's `weight_scale_inv` convention."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ConfigError(f"An FP8 scale has shape {list(scale_inv.shape)} for a weight of shape {[rows, cols]}; "
                          f"with {block[0]}x{block[1]} blocks it must be {list(expected)}. Valid: "
                          "`quantization_config.weight_block_size` matching the stored scales.")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], dst: Path, dtype: torch.dtype,
                  max_shard_bytes: int, keep_fp32: tuple[str, ...] = ("e_score_correction_bias",)) -> list[str]:
    """Write (name, tensor) pairs as `model.safetensors`, or as shards of at most `max_shard_bytes` plus the
    index when they do not fit in one. Tensors whose name ends with `keep_fp32` stay FP32. Returns file names."""
    plan = []  # (name, tensor, dtype, bytes)
    for name, tensor in tensors:
        out_dtype = torch.float32 if name.endswith(keep_fp32) else dtype
        plan.append((name, tensor, out_dtype, tensor.numel() * out_dtype.itemsize))
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[3]
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for file, shard in zip(names, shards):
        # copy=True: expert slices and the repeated shared head must not share storage inside one file
        data = {name: t.detach().to(dtype=dt, copy=True).contiguous() for name, t, dt, _ in shard}
        save_file(data, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name, *_ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(item[3] for item in plan)}, "weight_map": weight_map}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
