"""The CMake flags that build llama.cpp for the CPU it will run on, and the cache key of that build.

`install.sh` compiles llama-cpp-python once and keeps the wheel. ggml's x86 options are on/off switches
that compile the CPU backend for an instruction set whether or not the CPU has it, so an option the
CPU lacks means "Illegal instruction" at the first matmul (Zen 2/3/4, Skylake-X and Cascade Lake lack
AVX-VNNI; many AVX-512 CPUs lack VNNI, VBMI or BF16). Here every option is switched on only when
/proc/cpuinfo lists the instructions it compiles for, and the wheel is cached under a key made of
those flags, so a wheel built on one CPU is only reused on a CPU that the same flags fit.

    python packaging/llama_cpp_flags.py flags      # CMAKE_ARGS for this CPU
    python packaging/llama_cpp_flags.py key        # cache key (flags plus, on ARM, the CPU features)

Stdlib only: it runs before anything else is installed.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

# ggml option -> the cpuinfo flags of every instruction it lets the compiler emit
# (GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw).
X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# The AVX-512 extensions are compiled in only together with GGML_AVX512 itself.
NEEDS_AVX512 = ("GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16")
# llama.cpp's AMX matmul segfaults in some VMs (seen on Sapphire Rapids guests): always off.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (x86 `flags`, ARM `Features`)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def x86_cmake_flags(flags: set[str]) -> list[str]:
    on = {opt for opt, need in X86_OPTIONS.items() if all(f in flags for f in need)}
    if "GGML_AVX512" not in on:
        on -= set(NEEDS_AVX512)
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if opt in on else 'OFF'}" for opt in X86_OPTIONS]
    args += [f"-D{opt}=OFF" for opt in ALWAYS_OFF]
    return args


def cmake_flags(machine: str, cpuinfo: str) -> list[str]:
    if machine in ("x86_64", "AMD64"):
        return x86_cmake_flags(cpu_flags(cpuinfo))
    # ARM and the rest: ggml's native build asks the compiler for this CPU (-mcpu=native), which is
    # right for the machine that builds; the cache key below carries the CPU's features so the wheel
    # is not reused on another CPU.
    return []


def cache_key(machine: str, cpuinfo: str) -> str:
    args = cmake_flags(machine, cpuinfo)
    native = "" if args else " ".join(sorted(cpu_flags(cpuinfo)))
    digest = hashlib.sha256(f"{machine}|{' '.join(args)}|{native}".encode()).hexdigest()[:12]
    return f"{machine}-{digest}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("flags", "key"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: llama_cpp_flags.py flags|key", file=sys.stderr)
        return 2
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""  # macOS: no /proc; the Metal recipe builds natively on the Mac itself
    machine = platform.machine()
    print(" ".join(cmake_flags(machine, cpuinfo)) if argv[1] == "flags" else cache_key(machine, cpuinfo))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
