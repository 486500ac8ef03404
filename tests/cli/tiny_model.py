"""A tiny language model with two nanoGPT-style attentions and a tied output head: converts in well
under a second. The command-line tests also use this file's text as a user's model.py."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH, HEADS = 32, 16, 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.first = Attention()
        self.norm = nn.LayerNorm(WIDTH)
        self.second = Attention()
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.first(x)
        x = x + self.second(self.norm(x))
        return self.head(x)


def tokens(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def build_model():
    return TinyLM().eval()


def example_inputs():
    return (tokens(),)
