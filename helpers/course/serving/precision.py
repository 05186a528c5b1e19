"""Precision for serving: what bf16 weights and int8 weight quantization save, and what they change.

    weight_bytes(model)                 bytes of every parameter and buffer that is a weight
    quantize_int8(model)                every nn.Linear -> Int8Linear (in place): int8 weights, one fp32
                                        scale per output row (symmetric, per-channel: W ~= scale * q)
    allreduce_bytes_per_token(config, dtype, tp)   what tensor parallelism all-reduces for one token

Int8Linear dequantizes on the fly (q.to(x.dtype) * scale) and then runs a float matmul: it saves memory,
not arithmetic. Real int8 kernels (vLLM's W8A8, bitsandbytes) also multiply in int8.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """y = x @ (scale * q).T + bias, with q int8 [out, in] and scale fp32 [out, 1]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        weight = self.q.to(x.dtype) * self.scale.to(x.dtype)
        return nn.functional.linear(x, weight, self.bias)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and of the int8 weights and scales (not of rotary-embedding caches)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.q.numel() * m.q.element_size() + m.scale.numel() * m.scale.element_size()
    return total


def allreduce_bytes_per_token(config, dtype: torch.dtype, tp: int) -> int:
    """Payload all-reduced per generated token by a tensor-parallel Llama (chapter 2's plan): two per decoder
    layer (after o_proj and after down_proj), each of hidden_size values, plus one for the vocab-parallel
    embedding. Zero when tp == 1."""
    if tp == 1:
        return 0
    element = torch.tensor([], dtype=dtype).element_size()
    return (2 * config.num_hidden_layers + 1) * config.hidden_size * element
