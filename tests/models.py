"""Small models that exercise what the passes must get right, each with example inputs.

Each factory returns (model, args): the model's forward returns a scalar loss (or the loss first).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt import GPT, PRESETS

BATCH = 8


class MLP(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, y):
        return F.mse_loss(self.fc2(F.gelu(self.fc1(x))), y)


class DeepMLP(nn.Module):
    """Enough layers to give every stage of a 4- or 8-stage pipeline some parameters."""

    def __init__(self, dim=16, depth=8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x, y):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return F.mse_loss(x, y)


class AttentionBlock(nn.Module):
    """Pre-LN attention block; `manual` spells attention out as matmul, scale, mask, softmax, matmul."""

    def __init__(self, dim=16, heads=2, manual=False):
        super().__init__()
        self.heads, self.manual = heads, manual
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, y):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.manual:
            scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            att = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.out(att.transpose(1, 2).reshape(b, t, c))
        return F.mse_loss(h, y)


class TiedEmbedding(nn.Module):
    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, targets):
        return F.cross_entropy(self.head(torch.tanh(self.proj(self.emb(idx)))).flatten(0, 1), targets.flatten())


class WithUnusedParameter(MLP):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(16, 16)  # never called: its grads stay None
        self.frozen = nn.Parameter(torch.randn(16), requires_grad=False)
        self.no_grad_path = nn.Parameter(torch.randn(16))  # read, but only through detach()

    def forward(self, x, y):
        return super().forward(x + self.frozen + self.no_grad_path.detach(), y)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x, y):
        return F.mse_loss(self.fc(x) * self.scale, y)


class ConvNorm(nn.Module):
    """convolution_backward is a fused op with output_mask: B and W each need part of it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x, y):
        return F.mse_loss(self.fc(F.relu(self.norm(self.conv(x))).flatten(1)), y)


class LossAndLogits(MLP):
    """Several outputs: the loss first, then a tensor returned detached."""

    def forward(self, x, y):
        out = self.fc2(F.gelu(self.fc1(x)))
        return F.mse_loss(out, y), out


class Pooled(nn.Module):
    """Per-token layers, a mean over the sequence, then layers on the pooled vector: the first half's cost grows
    with the sequence length and the second's does not, so balanced stage cuts move with the length."""

    def __init__(self, dim=32, layers=4):
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.tokens = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(layers)])
        self.head = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(layers)])

    def forward(self, ids, y):
        return F.mse_loss(self.head(self.tokens(self.emb(ids)).mean(1)), y)


def mlp(x_requires_grad=False):
    return MLP(), (torch.randn(BATCH, 16, requires_grad=x_requires_grad), torch.randn(BATCH, 16))


def deep_mlp():
    return DeepMLP(), (torch.randn(BATCH, 16), torch.randn(BATCH, 16))


def sdpa_block():
    return AttentionBlock(), (torch.randn(BATCH, 6, 16), torch.randn(BATCH, 6, 16))


def manual_attention_block():
    return AttentionBlock(manual=True), (torch.randn(BATCH, 6, 16), torch.randn(BATCH, 6, 16))


def gpt():
    config = PRESETS["tiny"]
    return GPT(config), (torch.randint(0, 256, (BATCH, 16)), torch.randint(0, 256, (BATCH, 16)))


def gpt_manual_attention():
    config = PRESETS["tiny"].with_(attention="manual")
    return GPT(config), (torch.randint(0, 256, (BATCH, 16)), torch.randint(0, 256, (BATCH, 16)))


def tied_embedding():
    return TiedEmbedding(), (torch.randint(0, 32, (BATCH, 5)), torch.randint(0, 32, (BATCH, 5)))


def unused_parameter():
    return WithUnusedParameter(), (torch.randn(BATCH, 16), torch.randn(BATCH, 16))


def buffer():
    return WithBuffer(), (torch.randn(BATCH, 16), torch.randn(BATCH, 16))


def conv_norm(x_requires_grad=True):
    return ConvNorm(), (torch.randn(BATCH, 4, 16, requires_grad=x_requires_grad), torch.randn(BATCH, 4))


def loss_and_logits():
    return LossAndLogits(), (torch.randn(BATCH, 16, requires_grad=True), torch.randn(BATCH, 16))


END_TO_END = {
    "mlp": mlp,
    "gpt": gpt,
    "gpt_manual_attention": gpt_manual_attention,
    "sdpa_block": sdpa_block,
    "manual_attention_block": manual_attention_block,
    "tied_embedding": tied_embedding,
    "unused_parameter": unused_parameter,
    "buffer": buffer,
    "conv_norm": conv_norm,
    "loss_and_logits": loss_and_logits,
}
