"""Run each native kernel once on fixed inputs and print the results as JSON: the CPU-portability test runs
this under qemu-user as CPUs with and without AVX2 (stdlib only: no numpy or torch under emulation).

    python native_smoke_proc.py LIBRARY ISA       # ISA: a number, or `best`
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
import sys


def half(x: float) -> bytes:
    return struct.pack("<e", x)


def main() -> None:
    lib = ctypes.CDLL(sys.argv[1])
    isa = lib.rl_cpu_best_isa() if sys.argv[2] == "best" else int(sys.argv[2])
    n, k, rows = 16, 256, 2
    x = (ctypes.c_float * (rows * k))(*[math.sin(0.37 * i) * (1 + i % 7) for i in range(rows * k)])
    results: dict[str, list[float]] = {}
    # (name, ggml type, repacked format, block bytes, weights per block, offsets of its fp16 scales)
    formats = (
        ("q4_1", 3, 1, 20, 32, (0, 2)),
        ("q4_0", 2, 5, 18, 32, (0,)),
        ("q8_0", 8, 2, 34, 32, (0,)),
        ("q5_0", 6, 3, 22, 32, (0,)),
        ("q4_k", 12, 1, 144, 256, (0, 2)),
        ("q6_k", 14, 4, 210, 256, (208,)),
        ("tq2_0", 35, 6, 66, 256, (64,)),
    )
    for name, gguf_type, fmt, block, per_block, halves in formats:
        raw = bytearray()
        for i in range(n * k // per_block):
            blk = bytearray((37 * i + 11 * j) % 256 for j in range(block))
            for at in halves:  # finite scales (arbitrary bytes could be inf or NaN)
                blk[at : at + 2] = half(0.01 + 0.001 * (i % 5))
            raw += blk
        src = (ctypes.c_uint8 * len(raw)).from_buffer(raw)
        size = lib.rl_repacked_size(gguf_type, n, k)
        dst = (ctypes.c_uint8 * size)()
        assert lib.rl_repack(gguf_type, src, n, k, dst) == 0, name
        out = (ctypes.c_float * (rows * n))()
        assert lib.rl_test_matvec(isa, fmt, dst, n, k, x, rows, out) == isa, name
        results[name] = list(out)
    q, d, s = (ctypes.c_int8 * k)(), (ctypes.c_float * (k // 32))(), (ctypes.c_float * (k // 32))()
    h = (ctypes.c_int32 * (k // 16))()
    assert lib.rl_test_quantize(isa, x, k, q, d, s, h) == isa
    results["quantize"] = list(q) + list(d) + list(s) + list(h)
    e = (ctypes.c_float * 40)(*[-20 + i for i in range(40)])
    assert lib.rl_test_exp(isa, e, 40) == isa
    results["exp"] = [v / math.exp(-20 + i) for i, v in enumerate(e)]  # relative: ~1 everywhere
    g, hd, keys = 3, 64, 20
    qv = (ctypes.c_float * (g * hd))(*[math.cos(0.1 * i) for i in range(g * hd)])
    kv = (ctypes.c_uint16 * (keys * hd))(
        *[struct.unpack("<H", half(math.sin(0.03 * i)))[0] for i in range(keys * hd)]
    )
    vv = (ctypes.c_uint16 * (keys * hd))(
        *[struct.unpack("<H", half(math.cos(0.05 * i)))[0] for i in range(keys * hd)]
    )
    m, lsum, acc = (ctypes.c_float * g)(), (ctypes.c_float * g)(), (ctypes.c_float * (g * hd))()
    assert lib.rl_test_attn(isa, qv, g, hd, kv, vv, keys, 1, ctypes.c_float(0.125), m, lsum, acc) == isa
    results["attention"] = [acc[i] / lsum[i // hd] for i in range(g * hd)]
    print(json.dumps({"isa": isa, "results": results}))


if __name__ == "__main__":
    main()
