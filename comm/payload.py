"""Wire payloads: every row of a transfer travels as one row of bytes (uint8), so one all-to-all carries
a token's hidden state, its routing and its origin together, and FP8 data crosses transports without a
float8 type (gloo).

Dispatch row layout: [x | scales | gates | expert ids | source rank, source token]
  x       H values in the payload dtype, or H E4M3 bytes when FP8 (arXiv 2412.19437 §3.2.2: dispatch payload is FP8)
  scales  ceil(H/128) FP32 dequantization factors, one per 1x128 tile (FP8 only)
  gates   K FP32 gate values (gating stays FP32)
  ids     K int32 global expert ids
  source  2 int32: the token's EP rank and its row index there
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetron.fp8.quant import TILE, dequantize_1x128, quantize_1x128


def to_bytes(columns: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate row-aligned 2-D tensors of any dtypes into one uint8 [N, total bytes] tensor."""
    return torch.cat([c.contiguous().view(torch.uint8) for c in columns], dim=1)


def from_bytes(buf: torch.Tensor, specs: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of to_bytes: specs are (columns, dtype) per field, in order."""
    out, start = [], 0
    for cols, dtype in specs:
        width = cols * torch.empty((), dtype=dtype).element_size()
        out.append(buf[:, start:start + width].contiguous().view(dtype))
        start += width
    if start != buf.shape[1]:
        raise ValueError(f"payload rows have {buf.shape[1]} bytes, the format describes {start}")
    return out


def row_bytes(specs: list[tuple[int, torch.dtype]]) -> int:
    return sum(cols * torch.empty((), dtype=dtype).element_size() for cols, dtype in specs)


@dataclass(frozen=True)
class DispatchFormat:
    hidden: int
    top_k: int
    dtype: torch.dtype  # the dtype x is sent in when not FP8, and returned in
    fp8: bool = False

    def specs(self) -> list[tuple[int, torch.dtype]]:
        x = [(self.hidden, torch.uint8), (-(-self.hidden // TILE), torch.float32)] if self.fp8 else [
            (self.hidden, self.dtype)]
        return x + [(self.top_k, torch.float32), (self.top_k, torch.int32), (2, torch.int32)]

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.specs())

    def pack(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, src_rank: int) -> torch.Tensor:
        tokens = x.shape[0]
        source = torch.stack([torch.full((tokens,), src_rank, dtype=torch.int32),
                              torch.arange(tokens, dtype=torch.int32)], 1).to(x.device)
        if self.fp8:
            data, scales = quantize_1x128(x)
            xs = [data.view(torch.uint8), scales]
        else:
            xs = [x.to(self.dtype)]
        return to_bytes(xs + [gates.float(), ids.to(torch.int32), source])

    def ids(self, buf: torch.Tensor) -> torch.Tensor:
        """The expert ids of packed rows, without decoding the rest (used to route the next hop)."""
        end = self.row_bytes - 8
        return buf[:, end - 4 * self.top_k:end].contiguous().view(torch.int32)

    def unpack(self, buf: torch.Tensor):
        """-> x [N, H] in self.dtype, gates [N, K] FP32, ids [N, K] int64, source [N, 2] int64."""
        fields = from_bytes(buf, self.specs())
        if self.fp8:
            data, scales = fields[0], fields[1]
            x = dequantize_1x128(data.view(torch.float8_e4m3fn), scales, self.dtype)
            fields = fields[2:]
        else:
            x, fields = fields[0], fields[1:]
        gates, ids, source = fields
        return x, gates, ids.long(), source.long()
