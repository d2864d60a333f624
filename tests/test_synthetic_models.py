"""Synthetic models of real shapes (`ripe bench --synthetic`): valid files that both engines load and run."""

from __future__ import annotations

import math

import pytest
import torch

from ripelm.models.gguf_file import open_gguf
from ripelm.models.synthetic import SHAPES, build_synthetic


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_synthetic_model_loads_and_runs_on_both_engines(tmp_path, bundled_model_path, name):
    # Q4_K_M in two layers: layer 0 mixes types (Q5_0 Q/K beside a Q8_0 V, a Q6_K ffn_down), layer 1 has
    # one type for Q/K/V and a Q4_K ffn_down
    layers = 2 if name.endswith("q4_k_m") else 1
    path = build_synthetic(name, tmp_path / f"{name}.gguf", bundled_model_path, n_layers=layers)
    g = open_gguf(path)  # our validator: every tensor's type, shape and size agree
    shape = SHAPES[name]
    assert g.metadata[f"{shape.arch}.embedding_length"] == shape.hidden
    q = "attn_qkv" if shape.phi3 else "attn_q"  # phi3 stores Q, K and V as one matrix
    types = {g.tensors[f"blk.0.{t}.weight"].ggml_type for t in (q, "ffn_down")}
    g.close()
    assert types == {int(shape.types(q, 0)), int(shape.types("ffn_down", 0))}

    from native_reference import NativeBackend

    from ripelm.runtime import native_decode
    from ripelm.runtime.llama_cpp_backend import LlamaCppBackend

    native = NativeBackend(path, device="cpu", n_ctx=128)
    # every shape runs on the native CPU step (no "native CPU decode step not used" notice)
    assert native.runner is not None, native_decode._why_not_model
    assert native_decode._why_not_model is None
    ids = native.tokenizer.encode("The lighthouse keeper wrote", add_bos=False)
    ours = native.teacher_forced_logits(ids, chunk=1)
    assert torch.isfinite(ours).all()
    llama = LlamaCppBackend(path, n_ctx=128, n_threads=2, logits_all=True, tokenizer=native.tokenizer)
    theirs = torch.from_numpy(llama.teacher_forced_logits(ids)).float()
    llama.close()
    assert torch.isfinite(theirs).all()
    # random weights, same file: both engines compute the same function up to their rounding
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cos.min() > 0.99, cos
    assert not math.isnan(float(ours.std()))
