"""A plain torch BERT encoder + mean pooling: the reference the llama.cpp embeddings are checked against.

It reads the same safetensors weights the converter reads and runs them in float32 (post-LayerNorm BERT:
embeddings -> LayerNorm -> N x [self-attention, add & norm, GELU MLP, add & norm] -> mean over tokens).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def bert_mean_embedding(weights: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    def w(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(weights[name], dtype=np.float32))

    eps = float(config["layer_norm_eps"])
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    hd = hidden // heads
    t = torch.tensor(ids)
    x = w("embeddings.word_embeddings.weight")[t]
    x = x + w("embeddings.position_embeddings.weight")[: len(ids)]
    x = x + w("embeddings.token_type_embeddings.weight")[0]
    x = F.layer_norm(x, (hidden,), w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."

        def lin(name: str, h: torch.Tensor, p: str = p) -> torch.Tensor:
            return F.linear(h, w(p + name + ".weight"), w(p + name + ".bias"))

        q = lin("attention.self.query", x).view(-1, heads, hd).transpose(0, 1)
        k = lin("attention.self.key", x).view(-1, heads, hd).transpose(0, 1)
        v = lin("attention.self.value", x).view(-1, heads, hd).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(0, 1).reshape(-1, hidden)
        x = F.layer_norm(
            x + lin("attention.output.dense", att),
            (hidden,),
            w(p + "attention.output.LayerNorm.weight"),
            w(p + "attention.output.LayerNorm.bias"),
            eps,
        )
        h = F.gelu(lin("intermediate.dense", x))
        x = F.layer_norm(
            x + lin("output.dense", h),
            (hidden,),
            w(p + "output.LayerNorm.weight"),
            w(p + "output.LayerNorm.bias"),
            eps,
        )
    v = x.mean(dim=0)
    return (v / v.norm()).numpy()
