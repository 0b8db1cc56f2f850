"""A tiny decoder-only transformer for character-level language modelling.

Attention is written out (not scaled_dot_product_attention) so that every projection is a plain
nn.Linear the pruner can see and the ONNX exporter maps to MatMul, and the causal mask is a
buffer. No weight tying: the embedding and the output head are pruned and quantized apart."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from workers.data.info import DataInfo


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        # Heads may number fewer than n_embd // head_dim: channel pruning deletes whole heads
        # (workers/compression/channel_slim.py) while the residual stream keeps its width.
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.drop = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("causal", mask.view(1, 1, block_size, block_size), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        hd = self.head_dim
        inner = self.n_head * hd
        q, k, v = self.qkv(x).split(inner, dim=2)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~self.causal[:, :, :t, :t], float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, inner)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc_proj(F.gelu(self.fc(self.ln2(x)))))


class Embedding(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_embd: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tok(idx.long()) + self.pos(pos))


class Head(nn.Module):
    def __init__(self, n_embd: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.ln(x))


class GPT(nn.Module):
    output_layer = "head.lm_head"

    def __init__(
        self, info: DataInfo, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, dropout: float = 0.0
    ):
        super().__init__()
        if info.kind != "tokens":
            raise ValueError("gpt takes token sequences")
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.block_size = info.input_shape[0]
        self.embed = Embedding(info.num_classes, self.block_size, n_embd, dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, self.block_size, dropout) for _ in range(n_layer))
        self.head = Head(n_embd, info.num_classes)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("proj.weight", "fc_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def pipeline_chain(self) -> list[tuple[str, nn.Module]]:
        """forward() as a chain of named modules, cut into pipeline stages by workers.models.stages."""
        return [
            ("embed", self.embed),
            *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
            ("head", self.head),
        ]
