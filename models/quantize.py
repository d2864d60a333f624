"""Re-encode a GGUF model at another precision (`ripe quantize`), keeping its metadata and tokenizer.

Which type each tensor gets follows llama.cpp's quantizer (llama-quant.cpp), written here from its rules:

* only 2-D+ tensors named `*weight` are converted, never norms (`*_norm.weight`), MoE gates, position or
  token-type embeddings; 1-D tensors (norms, biases) are stored as F32;
* for a quantized target the output head (`output.weight`, or a tied `token_embd.weight`) gets Q8_0:
  llama.cpp picks Q8_0 when the row does not fit the target's blocks and Q6_K otherwise, a type gguf-py
  cannot write, so Q8_0 (more precise, not less) stands in; an untied `token_embd.weight` of a ternary
  model gets Q4_0 where llama.cpp picks Q4_K (same 4.5 bits, not writable here);
* a row that is not a whole number of the type's blocks falls back: TQ1_0/TQ2_0 (blocks of 256) to Q4_0,
  anything still not fitting to F16. llama.cpp refuses Q4_0/Q4_1/Q8_0 rows that are not a multiple of 32;
  here they fall back to F16 too, and every fallback is reported;
* a tensor already in its chosen type is copied unchanged (no re-quantization loss).

Values are decoded with `ripelm.kernels.dequant` and encoded with gguf-py's quantizers (`gguf.quants`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ripelm.kernels.dequant import dequantize
from ripelm.models.errors import QuantizeError, UnsupportedModelError
from ripelm.models.gguf_file import GGUFFile, TensorInfo, open_gguf
from ripelm.models.gguf_output import Field, TensorOut, replace_fields, source_fields, write_gguf
from ripelm.models.quant_types import QuantType, block_layout

TARGETS: dict[str, QuantType] = {
    "q4_0": QuantType.Q4_0,
    "q4_1": QuantType.Q4_1,
    "q8_0": QuantType.Q8_0,
    "tq1_0": QuantType.TQ1_0,
    "tq2_0": QuantType.TQ2_0,
    "f16": QuantType.F16,
    "f32": QuantType.F32,
}
# general.file_type (llama_ftype) written for each target
FILE_TYPES: dict[QuantType, int] = {
    QuantType.F32: int(gguf.LlamaFileType.ALL_F32),
    QuantType.F16: int(gguf.LlamaFileType.MOSTLY_F16),
    QuantType.Q4_0: int(gguf.LlamaFileType.MOSTLY_Q4_0),
    QuantType.Q4_1: int(gguf.LlamaFileType.MOSTLY_Q4_1),
    QuantType.Q8_0: int(gguf.LlamaFileType.MOSTLY_Q8_0),
    QuantType.TQ1_0: int(gguf.LlamaFileType.MOSTLY_TQ1_0),
    QuantType.TQ2_0: int(gguf.LlamaFileType.MOSTLY_TQ2_0),
}
FLOAT_TYPES = (QuantType.F32, QuantType.F16)
TERNARY = (QuantType.TQ1_0, QuantType.TQ2_0)
_NOT_QUANTIZED = re.compile(
    r"(_norm\.weight|ffn_gate_inp\.weight|^position_embd\.weight|^token_types\.weight|attn_rel_b\.weight)$"
)
CHUNK_ELEMENTS = 1 << 24  # rows converted at a time: bounds the float32 temporaries to ~64 MB


@dataclass(frozen=True)
class TensorPlan:
    """The type one tensor gets, and why it differs from the requested one when it does."""

    name: str
    shape: tuple[int, ...]  # GGUF order
    src_type: QuantType
    dst_type: QuantType
    note: str = ""  # set when the tensor did not get the requested type
    fallback: bool = False  # the requested type could not hold this tensor's rows

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class QuantizeResult:
    path: Path
    target: QuantType
    plans: list[TensorPlan]
    src_bytes: int
    dst_bytes: int
    fallbacks: list[TensorPlan] = field(default_factory=list)


def parse_target(name: str) -> QuantType:
    t = TARGETS.get(name.lower())
    if t is None:
        raise QuantizeError(f"unknown type '{name}' (choose from {', '.join(TARGETS)})")
    return t


def _fits(t: QuantType, row: int) -> bool:
    return row % block_layout(t)[0] == 0


def plan_tensor(
    info: TensorInfo, target: QuantType, *, has_output: bool, head: QuantType | None = None
) -> TensorPlan:
    """The output type of one tensor for a `target` model, following llama.cpp's rules (module doc).

    `head` overrides the output head's type (llama.cpp's --output-tensor-type): a draft model, whose
    accuracy matters less than its speed, can take a 4-bit head."""
    src = QuantType(info.ggml_type)
    name, shape = info.name, info.shape
    if len(shape) < 2:
        return TensorPlan(name, shape, src, QuantType.F32)
    if not name.endswith("weight") or _NOT_QUANTIZED.search(name):
        return TensorPlan(name, shape, src, src, note="kept in its source type")
    if target in FLOAT_TYPES:
        return TensorPlan(name, shape, src, target)
    row = shape[0]
    wanted, note = target, ""
    is_head = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    if is_head and head is not None:
        wanted, note = head, ""
    elif is_head and target != QuantType.Q8_0:
        wanted, note = QuantType.Q8_0, "output head at Q8_0 (llama.cpp: Q8_0 or Q6_K)"
    elif name == "token_embd.weight" and target in TERNARY:
        wanted, note = QuantType.Q4_0, "token embeddings of a ternary model at Q4_0 (llama.cpp: Q4_K)"
    if _fits(wanted, row):
        return TensorPlan(name, shape, src, wanted, note=note)
    fb = QuantType.Q4_0 if wanted in TERNARY and _fits(QuantType.Q4_0, row) else QuantType.F16
    why = f"rows of {row} are not a multiple of the {wanted.name} block size {block_layout(wanted)[0]}"
    return TensorPlan(name, shape, src, fb, note=why, fallback=True)


def plan_model(g: GGUFFile, target: QuantType, head: QuantType | None = None) -> list[TensorPlan]:
    has_output = "output.weight" in g.tensors
    return [plan_tensor(info, target, has_output=has_output, head=head) for info in g.tensors.values()]


def _encode(values: np.ndarray, t: QuantType) -> np.ndarray:
    if t == QuantType.F32:
        return values.astype(np.float32, copy=False)
    if t == QuantType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(t)))


def _decode(plan: TensorPlan, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32 values of some rows: gguf-py's numpy decoder (fast on CPU), else ripelm's torch kernels."""
    try:
        values = gguf.quants.dequantize(
            np.asarray(raw).reshape(shape[0], -1), gguf.GGMLQuantizationType(plan.src_type)
        )
        return values.reshape(shape).astype(np.float32, copy=False)
    except (NotImplementedError, ValueError):
        pass
    try:
        return dequantize(raw, plan.src_type, shape).numpy()
    except ValueError as e:
        raise UnsupportedModelError(f"cannot convert tensor {plan.name}: {e}") from None


def _converter(g: GGUFFile, plan: TensorPlan) -> Callable[[], np.ndarray]:
    """A function producing the tensor's bytes in its planned type, a block of rows at a time."""
    raw = g.tensor_bytes(plan.name)
    if plan.src_type == plan.dst_type:
        return lambda: np.asarray(raw)
    row_len = plan.shape[0]
    n_rows = plan.n_elements // row_len
    src_row_bytes = raw.nbytes // n_rows
    step = max(1, CHUNK_ELEMENTS // row_len)

    def produce() -> np.ndarray:
        parts = []
        for r in range(0, n_rows, step):
            m = min(step, n_rows - r)
            values = _decode(plan, raw[r * src_row_bytes : (r + m) * src_row_bytes], (m, row_len))
            parts.append(np.ascontiguousarray(_encode(values, plan.dst_type)).view(np.uint8).reshape(-1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    return produce


def quantize_model(
    src: str | Path,
    dst: str | Path,
    target: QuantType | str,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    head: QuantType | str | None = None,
) -> QuantizeResult:
    """Write `src` re-encoded as `target` to `dst`, then validate the result; `progress(done, total, name)`
    counts elements."""
    t = parse_target(target) if isinstance(target, str) else target
    h = parse_target(head) if isinstance(head, str) else head
    if t not in FILE_TYPES or (h is not None and h not in FILE_TYPES):
        raise QuantizeError(f"cannot quantize to {t.name}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise QuantizeError("the output file would overwrite the input; choose another -o")
    if not dst.parent.is_dir():
        raise QuantizeError(f"output folder {dst.parent} does not exist")
    g = open_gguf(src)
    try:
        plans = plan_model(g, t, h)
        fields = replace_fields(
            source_fields(src),
            [
                Field("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32),
                Field("general.file_type", FILE_TYPES[t], gguf.GGUFValueType.UINT32),
            ],
        )
        outs = [TensorOut(p.name, p.shape, int(p.dst_type), _converter(g, p)) for p in plans]
        total = sum(p.n_elements for p in plans)
        done = 0

        def tick(i: int, out: TensorOut) -> None:
            nonlocal done
            done += plans[i].n_elements
            if progress is not None:
                progress(done, total, out.name)

        try:
            write_gguf(dst, fields, outs, alignment=g.alignment, on_tensor=tick)
        except OSError as e:
            raise QuantizeError(f"cannot write {dst}: {e.strerror or e}") from None
        src_bytes = sum(info.nbytes for info in g.tensors.values())
    finally:
        g.close()
    out = open_gguf(dst)  # the strict validator every model load goes through
    dst_bytes = sum(info.nbytes for info in out.tensors.values())
    out.close()
    return QuantizeResult(dst, t, plans, src_bytes, dst_bytes, [p for p in plans if p.fallback])


def summarize_fallbacks(fallbacks: list[TensorPlan]) -> list[str]:
    """One line per (layer-less name pattern, type, reason), e.g. 'blk.*.attn_q.weight x30 -> Q4_0 (...)'."""
    groups: dict[tuple[str, str, str], int] = {}
    for p in fallbacks:
        key = (re.sub(r"^blk\.\d+\.", "blk.*.", p.name), p.dst_type.name, p.note)
        groups[key] = groups.get(key, 0) + 1
    return [f"{pattern}{f' x{n}' if n > 1 else ''} -> {t} ({why})" for (pattern, t, why), n in groups.items()]
