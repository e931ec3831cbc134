"""Tiny models with the module names of three model families, for ``check.inject_lora`` (notebook 02).

Llama's ``layers.N.self_attn.q_proj``, T5's short ``block.N.attn.o`` and timm's ViT, whose
``patch_embed.proj`` is an ``nn.Conv2d`` beside ``nn.Linear`` layers called ``proj``: each name
rule a learner might write (substring, ``endswith``, top level only, any module type) picks the
wrong layers in one of them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["_LlamaLike", "_T5Like", "_ViTLike"]


class _LlamaLike(nn.Module):
    """Llama's names: layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{up,down}_proj, embed, norm, lm_head."""

    def __init__(self, width: int = 6, blocks: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, width)
        self.layers = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, name, nn.Linear(width, width, bias=False))
            block.mlp = nn.Module()
            block.mlp.up_proj, block.mlp.down_proj = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
            self.layers.append(block)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, 11, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for block in self.layers:
            a = block.self_attn
            x = x + a.o_proj(a.v_proj(x) * a.q_proj(x).sigmoid() + a.k_proj(x))
            x = x + block.mlp.down_proj(block.mlp.up_proj(x).relu())
        return self.lm_head(self.norm(x))


class _T5Like(nn.Module):
    """T5's short names: block.N.attn.{q,k,v,o} and block.N.ff.{wi,wo}. The letter "o" is also in
    "block" and "wo": only a match on the last part of a name picks the right layers."""

    def __init__(self, width: int = 5, blocks: int = 2):
        super().__init__()
        self.block = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Module()
            b.attn = nn.Module()
            for name in ("q", "k", "v", "o"):
                setattr(b.attn, name, nn.Linear(width, width, bias=False))
            b.ff = nn.Module()
            b.ff.wi, b.ff.wo = nn.Linear(width, 3 * width, bias=False), nn.Linear(3 * width, width, bias=False)
            self.block.append(b)

    def forward(self, x):
        for b in self.block:
            x = x + b.attn.o(b.attn.q(x) * b.attn.k(x).tanh() + b.attn.v(x))
            x = x + b.ff.wo(b.ff.wi(x).relu())
        return x


class _ViTLike(nn.Module):
    """timm's ViT names: patch_embed.proj is an nn.Conv2d, blocks.N.attn.proj an nn.Linear, head at the top."""

    def __init__(self, width: int = 8, blocks: int = 2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=2, stride=2)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Module()
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
            self.blocks.append(b)
        self.head = nn.Linear(width, 4)

    def forward(self, image):
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (batch, patches, width)
        for b in self.blocks:
            x = x + b.attn.proj(b.attn.qkv(x).tanh())
            x = x + b.mlp.fc2(b.mlp.fc1(x).relu())
        return self.head(x.mean(1))
