"""ctypes binding of ripelm's native CPU library (`kernels/native/*.c`, built at install as `_ripe_native`).

ctypes releases the GIL for the length of every foreign call, so a whole decode step runs without it.
`load()` returns None when the library is missing (not built: no compiler at install time), cannot be
loaded, or is switched off with `RIPELM_NATIVE=0`; callers then run the torch path. `RIPELM_NATIVE_ISA`
(`ref`, `avx2`, `avxvnni`, `avx512vnni`; on ARM64 `neon`, `dotprod`) caps the instruction set, for tests and
for comparing paths; `RIPELM_NATIVE_SPIN_US` sets how long an idle pool worker spins for the next step
before it sleeps (default 500).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

ISA_NAMES = {0: "reference C", 1: "AVX2", 2: "NEON", 3: "NEON dotprod", 4: "AVX-VNNI", 5: "AVX512-VNNI"}
ISA_BY_NAME = {"ref": 0, "avx2": 1, "neon": 2, "dotprod": 3, "avxvnni": 4, "avx512vnni": 5}
# repacked formats (kernels/native/repack.c)
FMT_Q4, FMT_Q8, FMT_Q5, FMT_Q6, FMT_Q4_0, FMT_T2 = 1, 2, 3, 4, 5, 6

_c_float_p = ctypes.POINTER(ctypes.c_float)
_vp = ctypes.c_void_p
_i = ctypes.c_int
_lib: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None


def _library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_ripe_native{suffix}"
        if p.exists():
            return p
    return None


def load() -> ctypes.CDLL | None:
    """The library, or None (see `why_not()`)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("RIPELM_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        _why_not = "switched off by RIPELM_NATIVE=0"
        return None
    path = _library_path()
    if path is None:
        _why_not = "the native library was not built (no C compiler at install time?)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _why_not = f"the native library did not load: {e}"
        return None
    _declare(lib)
    _lib = lib
    return lib


def why_not() -> str | None:
    load()
    return _why_not


def _declare(lib: ctypes.CDLL) -> None:
    f = lib.rl_model_new
    f.restype = _vp
    f.argtypes = [_i, _i, _i, _i, _i, _i, _i, _i, ctypes.c_float, ctypes.c_float, _vp]
    lib.rl_model_set_isa.argtypes = [_vp, _i]
    lib.rl_model_set_isa.restype = _i
    # (model, layer, attn_norm, ffn_norm, q_norm, k_norm, then (fmt, data) of q, k, v, the qkv bias, then
    # (fmt, data) of wo, gate, up, down)
    lib.rl_model_set_layer.argtypes = [_vp, _i, _vp, _vp, _vp, _vp, *[_i, _vp] * 3, _vp, *[_i, _vp] * 4]
    lib.rl_model_set_layer.restype = None
    if hasattr(lib, "rl_model_set_extras"):  # Gemma 3 (a library built before it lacks these)
        lib.rl_model_set_extras.argtypes = [_vp, _i, _vp]
        lib.rl_model_set_extras.restype = _i
        lib.rl_model_set_layer_extras.argtypes = [_vp, _i, _vp, _vp, _i]
        lib.rl_model_set_layer_extras.restype = None
    if hasattr(lib, "rl_model_set_rope_mscale"):  # phi3 LongRoPE (a library built before it lacks it)
        lib.rl_model_set_rope_mscale.argtypes = [_vp, ctypes.c_float]
        lib.rl_model_set_rope_mscale.restype = None
    lib.rl_model_set_head.argtypes = [_vp, _vp, _i, _i, _vp]
    lib.rl_model_set_head.restype = None
    lib.rl_model_set_kv.argtypes = [_vp, _vp, _vp, ctypes.c_int64, _i, _i]
    lib.rl_model_set_kv.restype = None
    lib.rl_model_free.argtypes = [_vp]
    lib.rl_model_free.restype = None
    lib.rl_step.argtypes = [_vp, _i, _i, _vp, _vp, _vp, _vp, _i, _vp, _i, _vp, _vp]
    lib.rl_step.restype = _i
    lib.rl_repacked_size.argtypes = [_i, _i, _i]
    lib.rl_repacked_size.restype = ctypes.c_size_t
    lib.rl_repack.argtypes = [_i, _vp, _i, _i, _vp]
    lib.rl_repack.restype = _i
    lib.rl_format_of.argtypes = [_i]
    lib.rl_format_of.restype = _i
    lib.rl_cpu_best_isa.argtypes = []
    lib.rl_cpu_best_isa.restype = _i
    lib.rl_isa_available.argtypes = [_i]
    lib.rl_isa_available.restype = _i
    lib.rl_test_quantize.argtypes = [_i, _vp, _i, _vp, _vp, _vp, _vp]
    lib.rl_test_quantize.restype = _i
    lib.rl_test_matvec.argtypes = [_i, _i, _vp, _i, _i, _vp, _i, _vp]
    lib.rl_test_matvec.restype = _i
    lib.rl_test_exp.argtypes = [_i, _vp, _i]
    lib.rl_test_exp.restype = _i
    lib.rl_test_attn.argtypes = [_i, _vp, _i, _i, _vp, _vp, _i, _i, ctypes.c_float, _vp, _vp, _vp]
    lib.rl_test_attn.restype = _i
    lib.rl_test_attn_rows.argtypes = [_i, _vp, _i, _i, _i, _vp, _vp, _vp, _vp, _i, ctypes.c_float]
    lib.rl_test_attn_rows.restype = _i
    lib.rl_dequant.argtypes = [_i, _i, _vp, _i, _i, _vp]
    lib.rl_dequant.restype = _i
    lib.rl_gather_rows.argtypes = [_i, _vp, _i, _vp, _i, _vp]
    lib.rl_gather_rows.restype = None
    lib.rl_head.argtypes = [_vp, _i, _i, _vp, _vp]
    lib.rl_head.restype = _i
    lib.rl_refine_top.argtypes = [_i, _vp, _i, _i, _vp, _vp, _i, _i, ctypes.c_float, _i, _vp]
    lib.rl_refine_top.restype = _i


def best_isa(lib: ctypes.CDLL) -> int:
    """The best instruction-set path this CPU runs, capped by RIPELM_NATIVE_ISA."""
    isa = lib.rl_cpu_best_isa()
    cap = os.environ.get("RIPELM_NATIVE_ISA", "").strip().lower()
    if cap in ISA_BY_NAME:  # the best path this CPU has at or below the cap (ids rank paths within an arch)
        isa = max((i for i in available_isas(lib) if i <= min(isa, ISA_BY_NAME[cap])), default=0)
    return isa


def available_isas(lib: ctypes.CDLL) -> list[int]:
    return [i for i in ISA_NAMES if lib.rl_isa_available(i)]


def ptr(a) -> int | None:  # noqa: ANN001 - a numpy array, a torch tensor or None
    """An array's or tensor's data address for a ctypes call (None stays NULL)."""
    if a is None:
        return None
    return a.ctypes.data if hasattr(a, "ctypes") else a.data_ptr()


def table_array(tables: list[list[int]], width: int):  # noqa: ANN201 - a numpy array
    """Block tables as a [rows, width] int32 array, padded with block 0 (read only where a row has keys)."""
    import numpy as np

    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
