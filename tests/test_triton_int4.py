"""The Triton 4-bit GEMV/GEMM and prefill dequantizer (kernels.triton_int4) and `Int4Linear` through them.

- With Triton installed and no GPU: the kernels under Triton's interpreter (a fresh process, the variable
  set before Triton loads) for several shapes, group sizes and row counts, every candidate configuration
  (both paths, split-K or not), against the float64 product of the dequantized weight; the dequantizer
  exact; `Int4Linear` holding the Triton layout (decode up to 16 rows, dequantize + matmul beyond).
- On a CUDA GPU (`-m gpu`; skipped without one): the same on the GPU at model-sized shapes, including the
  tuned choice; `Int4Linear` on CUDA in both RIPELM_CUDA_INT4 modes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = str(Path(__file__).resolve().parent)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton_cpu = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels for real"),
]

KERNEL_CHECK = """
import torch
from ripelm.kernels import triton_int4 as t4
torch.manual_seed(0)
for n, k, g, m in SHAPES:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // g) * 0.02 + 0.001
    offset = -8 * scale + torch.randn(n, k // g) * 1e-3
    w4 = t4.prepare(codes, scale, offset, g)
    s16, o16 = scale.half().float(), offset.half().float()
    w = (codes.view(n, k // g, g).float() * s16[..., None] + o16[..., None]).view(n, k)
    wd = w4.to(DEV)
    assert torch.equal(t4.dequantize_t(wd, torch.float32).cpu().t(), w), (n, k, g)
    wb = t4.dequantize_t(wd, torch.bfloat16).cpu().t()
    if DEV == "cuda":  # round to nearest even, as torch; the interpreter truncates: within one step there
        assert torch.equal(wb, w.bfloat16()), (n, k, g)
    assert ((wb.float() - w).abs() <= w.abs() * 2**-7).all(), (n, k, g)
    x = (torch.randn(m, k) * 3).bfloat16()
    ref = x.double() @ w.double().T
    sms = t4._sms(torch.device(DEV))
    for cfg in t4._candidates(m, wd, sms) + [None]:
        y = t4.matmul(x.to(DEV), wd) if cfg is None else t4._launch(x.to(DEV), wd, cfg)
        assert y.shape == (m, n) and y.dtype == torch.float32
        err = ((y.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (n, k, g, m, cfg, err)
print("ok")
"""

SMALL = [(48, 256, 32, 1), (40, 512, 32, 5), (16, 128, 64, 16), (70, 384, 128, 3), (64, 256, 256, 1)]
BIG = [(4096, 4096, 32, 1), (4096, 11008, 32, 1), (12288, 4096, 32, 8), (4096, 14336, 32, 16)]


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    head = f"import sys\nsys.path.insert(0, {TESTS_DIR!r})\nimport triton_interpreter_fixes\n"
    r = subprocess.run(
        [sys.executable, "-c", head + script], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@needs_triton_cpu[0]
@needs_triton_cpu[1]
def test_int4_kernels_under_the_interpreter():
    """Every candidate configuration within 1e-5 of float64 (the products are exact: bf16 activations,
    integer codes; float32 sums), and the dequantizer exact in float32 and bfloat16."""
    _interpret(f"DEV = 'cpu'\nSHAPES = {SMALL!r}\n" + KERNEL_CHECK)


LINEAR_CHECK = """
import os
import torch
from ripelm.kernels.packed_linear import Int4Codes, Int4Linear
for mode in ("triton", "tinygemm"):
    os.environ["RIPELM_CUDA_INT4"] = mode
    for rows in (1, 5, 16, 40):
        torch.manual_seed(rows)
        n, k, g = 128, 512, 32
        scale = torch.rand(n, k // g) * 0.02 + 0.001
        parts = [Int4Codes(torch.randint(0, 16, (n // 2, k), dtype=torch.uint8), s, -8 * s, g)
                 for s in scale.chunk(2)]  # two row shards (as Q/K/V are fused)
        bias = torch.randn(n)
        lin = Int4Linear(parts, bias, device=DEV, keep_codes=True, triton_layout=LAYOUT)
        assert lin._triton == (mode == "triton") and lin.out_features == n
        x = torch.randn(rows, k, device=DEV).bfloat16()
        ref = x.double().cpu() @ lin.reference_weight().double().T + bias.bfloat16().double()
        err = ((lin(x).double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if rows <= 16 and mode == "triton" else 1e-2), (mode, rows, err)
os.environ.pop("RIPELM_CUDA_INT4")
print("ok")
"""


@needs_triton_cpu[0]
@needs_triton_cpu[1]
def test_int4_linear_with_the_triton_layout_under_the_interpreter():
    """`Int4Linear` (two fused row shards, a bias) holding the Triton layout: up to 16 rows through the
    Triton matmul (RIPELM_CUDA_INT4=triton) or the int4 kernel, 40 rows through dequantize + matmul."""
    _interpret("DEV = 'cpu'\nLAYOUT = True\n" + LINEAR_CHECK)


# ---- on a CUDA GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_int4_kernels_on_gpu():
    exec(f"DEV = 'cuda'\nSHAPES = {SMALL + BIG!r}\n" + KERNEL_CHECK, {})


@pytest.mark.gpu
@needs_cuda
def test_int4_linear_on_cuda_in_both_modes():
    exec("DEV = 'cuda'\nLAYOUT = None\n" + LINEAR_CHECK, {})
