"""Mixture of experts that zb must refuse: routing with an expert capacity drops the tokens that come after the
capacity is full, and which tokens those are depends on every sample before them in the batch. (Per-token routing,
transformers' grouped_mm experts, is exact: tests/test_hf_models.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zb


class SwitchMoE(nn.Module):
    """Switch Transformer top-1 routing with an expert capacity: a token's position in its expert's queue is the
    cumsum, over every token of the batch, of the one-hot expert mask; tokens past the capacity are dropped (they
    pass through the residual only)."""

    def __init__(self, dim: int = 8, experts: int = 4, capacity: int = 3):
        super().__init__()
        self.experts, self.capacity = experts, capacity
        self.router = nn.Linear(dim, experts)
        self.weight = nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)

    def forward(self, x):
        tokens = x.flatten(0, 1)
        gate, expert = self.router(tokens).softmax(-1).max(-1)
        mask = F.one_hot(expert, self.experts)
        position = (torch.cumsum(mask, dim=0) * mask).sum(-1) - 1
        keep = (position < self.capacity).to(tokens.dtype)
        out = torch.bmm(tokens.unsqueeze(1), self.weight[expert]).squeeze(1) * (gate * keep).unsqueeze(-1)
        return x + out.view_as(x)


class SwitchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.moe, self.head = nn.Linear(8, 8), SwitchMoE(), nn.Linear(8, 5)

    def forward(self, x, y):
        return F.cross_entropy(self.head(self.moe(self.embed(x))).flatten(0, 1), y.flatten())


def test_expert_capacity_with_token_dropping_is_refused_naming_the_cumsum():
    x, y = torch.randn(8, 3, 8), torch.randint(0, 5, (8, 3))
    model = SwitchNet()
    model(x, y)  # eager runs it
    step = torch.compile(model, backend="zb", options={"stages": 2, "microbatches": 4, "compiler": "eager"})
    with pytest.raises(zb.ZbError, match=r"(?s)cumsum.*mixes samples"):
        step(x, y)
