"""Default embedder: shipped MiniLM weights, converted to GGUF and run by llama.cpp, match a torch BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bert_reference import bert_mean_embedding
from retrieval_helpers import embedder_gguf, make_home

from ripelm.models.bundled_embedder import WEIGHTS_SHA256, find_source, read_safetensors, wordpiece_vocab
from ripelm.models.errors import ModelFormatError
from ripelm.runtime.retrieval.embedder import Embedder

SENTENCES = [
    "The KV cache grows linearly with the sequence length.",
    "Speculative decoding accepts a drafted token with probability min(1, p/q).",
    "Café au lait, naïve résumé — UNUSUAL capitalisation & punctuation!?",
    "x",
]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return embedder_gguf(make_home(tmp_path_factory.mktemp("emb")))


@pytest.fixture(scope="module")
def embedder(gguf_path):
    e = Embedder(gguf_path, name="all-minilm:l6-v2", workers=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference():
    src = find_source()
    return read_safetensors(src.read("model.safetensors")), json.loads(src.read("config.json"))


def test_gguf_metadata_and_vocab(gguf_path):
    from ripelm.models.gguf_file import open_gguf

    g = open_gguf(gguf_path)
    try:
        assert g.architecture == "bert"
        assert g.get("bert.pooling_type") == 1  # mean
        assert g.get("bert.attention.causal") is False
        assert g.get("tokenizer.ggml.model") == "bert"
        tokens = g.get("tokenizer.ggml.tokens")
        assert len(tokens) == 30522 and tokens[101] == "[CLS]" and tokens[7592] == "\u2581hello"
        assert g.tensors["token_types.weight"].type_name == "F32"  # llama.cpp adds it to f32 activations
    finally:
        g.close()


def test_wordpiece_vocab_rejects_other_tokenizers():
    with pytest.raises(ModelFormatError):
        wordpiece_vocab({"model": {"type": "BPE", "vocab": {}}})


def test_weights_are_the_published_file():
    import hashlib

    assert hashlib.sha256(find_source().read("model.safetensors")).hexdigest() == WEIGHTS_SHA256


def test_llama_cpp_embeddings_match_torch_bert(embedder, reference):
    weights, config = reference
    model = embedder._models[0]
    ours = embedder.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    for text, v in zip(SENTENCES, ours, strict=True):
        ids = model.tokenize(text.encode(), add_bos=True, special=False)
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP], as BERT was trained
        ref = bert_mean_embedding(weights, config, ids)
        assert float(v @ ref) > 0.999, text


def test_similar_sentences_score_higher(embedder):
    a, b, c = embedder.embed(
        [
            "How much memory does the KV cache use?",
            "The key/value cache consumes a lot of GPU memory.",
            "Bananas are rich in potassium.",
        ]
    )
    assert a @ b > a @ c + 0.2


def test_long_text_is_cut_to_the_window_and_workers_agree(embedder, gguf_path):
    long = " ".join(f"word{i} memory attention" for i in range(400))
    cut = embedder.fit(long)
    assert len(embedder._models[0].tokenize(cut.encode(), add_bos=True, special=False)) <= 256
    texts = [long] + SENTENCES * 3
    many = embedder.embed(texts)
    with Embedder(gguf_path, workers=1) as single:
        one = single.embed(texts)
    np.testing.assert_allclose(many, one, atol=1e-4)
    assert embedder.embed([]).shape == (0, 384)


def test_a_truncated_embedder_file_ends_the_next_batch_with_one_error(gguf_path, tmp_path):
    """The embedding model has the chat engines' file guard: copied at load (small), checked per batch."""
    from ripelm.models.errors import ModelFileChangedError

    copy = tmp_path / "embedder.gguf"
    copy.write_bytes(gguf_path.read_bytes())
    e = Embedder(copy, name="all-minilm:l6-v2", workers=2)
    try:
        before = e.embed(["the keeper trims the wick"])
        with open(copy, "r+b") as f:  # truncated in place, as a download rewritten over it would be
            f.truncate(copy.stat().st_size // 2)
        with pytest.raises(ModelFileChangedError, match="truncated"):
            e.embed(["the keeper trims the wick"])
    finally:
        e.close()
    assert before.shape == (1, 384)
