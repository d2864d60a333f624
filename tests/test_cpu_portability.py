"""No CPU gets an illegal instruction: llama.cpp is built only for what the CPU has, and our native library
picks its kernels at run time.

- The llama.cpp flag choice (packaging/llama_cpp_flags.py) for the feature lists of real CPUs.
- The llama.cpp libraries installed here contain no instruction from an extension this CPU lacks
  (objdump; the extensions that ggml options switch on: AVX-512, AVX-VNNI, AVX512-VNNI/BF16/VBMI, AMX).
- Under qemu-user (Debian's qemu-user; skipped without it): our native library's kernels on an x86-64
  CPU without AVX (qemu64: the reference path) and on a Haswell (AVX2), and the llama.cpp engine on a
  Haswell, which has AVX2 but none of the AVX-512 family.
- Cross-compiled for ARM64 (aarch64-linux-gnu-gcc; skipped without it or qemu-aarch64): the NEON paths
  against the reference (tests/native_neon_check.c) under qemu-aarch64 as a CPU with the dot-product
  extension (-cpu max) and one without (-cpu cortex-a53, which must not get a dotprod instruction).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "packaging"))
import llama_cpp_flags  # noqa: E402

HASWELL = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 popcnt"
SKYLAKE_X = HASWELL + " avx512f avx512cd avx512dq avx512bw avx512vl"
CASCADE_LAKE = SKYLAKE_X + " avx512_vnni"
ZEN4 = CASCADE_LAKE + " avx512_bf16 avx512vbmi avx512ifma avx512_vbmi2"
ALDER_LAKE = HASWELL + " avx_vnni"
SAPPHIRE_RAPIDS = ZEN4 + " avx_vnni amx_tile amx_int8 amx_bf16"


def _on(flags: str) -> set[str]:
    args = llama_cpp_flags.cmake_flags("x86_64", f"processor : 0\nflags : {flags}\n")
    assert "-DGGML_NATIVE=OFF" in args
    return {a[2:-3] for a in args if a.endswith("=ON")}


@pytest.mark.parametrize(
    "flags,expected",
    [
        (HASWELL, set()),
        (SKYLAKE_X, {"GGML_AVX512"}),
        (CASCADE_LAKE, {"GGML_AVX512", "GGML_AVX512_VNNI"}),
        (ZEN4, {"GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI"}),
        (ALDER_LAKE, {"GGML_AVX_VNNI"}),
        (
            SAPPHIRE_RAPIDS,
            {"GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX512_VBMI", "GGML_AVX_VNNI"},
        ),
    ],
    ids=["haswell", "skylake-x", "cascade-lake", "zen4", "alder-lake", "sapphire-rapids"],
)
def test_llama_cpp_is_built_only_for_the_instructions_the_cpu_has(flags, expected):
    base = {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}
    assert _on(flags) == base | expected  # never AMX (it crashes in some VMs), never AVX-VNNI by default


def test_avx512_extensions_need_avx512_itself():
    assert _on(HASWELL + " avx512_vnni avx512_bf16") == _on(HASWELL)


def test_wheel_cache_key_changes_with_the_cpu():
    def key(flags: str) -> str:
        return llama_cpp_flags.cache_key("x86_64", f"flags : {flags}\n")

    assert key(HASWELL) == key(HASWELL + " sse4a")  # a flag no option uses: same build, same wheel
    assert len({key(HASWELL), key(SKYLAKE_X), key(CASCADE_LAKE), key(ZEN4), key(ALDER_LAKE)}) == 5
    arm = llama_cpp_flags.cache_key  # ARM builds natively: the key carries the CPU's features
    assert arm("aarch64", "Features : fp asimd\n") != arm("aarch64", "Features : fp asimd asimddp i8mm\n")


# Instructions that only the listed extension provides (AT&T syntax as objdump prints it).
EXTENSIONS = {
    "avx512f": re.compile(r"%zmm|%k[1-7]\b"),
    "avx_vnni": re.compile(r"\{vex\} vpdp(bu|ws)sds?"),
    "avx512_vnni": re.compile(r"^\s*vpdp(bu|ws)sds?\s+[^{]*%(zmm|ymm|xmm)", re.M),
    "avx512_bf16": re.compile(r"vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16"),
    "avx512vbmi": re.compile(r"vpermb|vpermi2b|vpermt2b|vpmultishiftqb"),
    "amx_tile": re.compile(r"tileloadd|tdpb[su][su]d|tdpbf16ps"),
}


def _cpu_flags() -> set[str]:
    return llama_cpp_flags.cpu_flags(Path("/proc/cpuinfo").read_text())


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.skipif(llama_cpp_flags.platform.machine() != "x86_64", reason="x86-64 instruction check")
def test_installed_llama_cpp_uses_no_extension_this_cpu_lacks():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted(p for p in lib_dir.glob("libggml*.so*") if not p.is_symlink())
    assert libs, f"no ggml libraries in {lib_dir}"
    have = _cpu_flags()
    for lib in libs:
        text = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True
        ).stdout
        for ext, pattern in EXTENSIONS.items():
            if ext not in have:
                m = pattern.search(text)
                assert m is None, f"{lib.name} uses {ext} ({m.group(0).strip()!r}), which this CPU lacks"


QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None or llama_cpp_flags.platform.machine() != "x86_64",
    reason="qemu-user (qemu-x86_64) not installed",
)


def _under_qemu(cpu: str | None, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = ([QEMU, "-cpu", cpu] if cpu else []) + [sys.executable, *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"}
    )


@needs_qemu
def test_native_kernels_run_on_cpus_without_avx_and_with_avx2_only():
    from ripelm.kernels import native_lib

    lib = native_lib.load()
    if lib is None:
        pytest.skip(f"native library: {native_lib.why_not()}")
    path = str(native_lib._library_path())
    script = str(Path(__file__).parent / "native_smoke_proc.py")
    here = _under_qemu(None, [script, path, "0"])
    assert here.returncode == 0, here.stderr
    reference = json.loads(here.stdout)
    for cpu, isa in (("qemu64", 0), ("Haswell", 1)):
        r = _under_qemu(cpu, [script, path, "best"])
        assert r.returncode == 0, f"{cpu}: {r.stderr[-2000:]}"  # -4 would be SIGILL
        got = json.loads(r.stdout)
        assert got["isa"] == isa, cpu
        for name, ref in reference["results"].items():
            out = got["results"][name]
            tol = 1e-4 * max(1.0, max(abs(v) for v in ref))
            assert all(abs(a - b) <= tol for a, b in zip(out, ref, strict=True)), (cpu, name)


@needs_qemu
def test_llama_cpp_engine_runs_on_a_haswell(tiny_model_factory):
    pytest.importorskip("llama_cpp")
    path = tiny_model_factory(qtype="Q4_0", n_layers=2)
    code = (
        "import sys\n"
        "from llama_cpp import Llama\n"
        "llm = Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)\n"
        "out = llm.create_completion('Hello', max_tokens=3, temperature=0)\n"
        "print(out['usage']['completion_tokens'])\n"
    )
    r = _under_qemu("Haswell", ["-c", code, str(path)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] in ("1", "2", "3")


CROSS_CC, QEMU_ARM = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
NATIVE_SOURCES = (
    "decode_step.c", "repack.c", "kernels_ref.c", "kernels_avx2.c", "kernels_vnni.c", "kernels_neon.c"
)


@pytest.fixture(scope="module")
def neon_check(tmp_path_factory) -> Path:
    """tests/native_neon_check.c with the library's C files, built for ARM64 as setup.py does (no -march)."""
    exe = tmp_path_factory.mktemp("arm64") / "native_neon_check"
    native = REPO / "kernels" / "native"
    flags = "-O2 -std=c11 -D_GNU_SOURCE -Wall -Werror".split()
    sources = [Path(__file__).parent / "native_neon_check.c", *(native / f for f in NATIVE_SOURCES)]
    cmd = [CROSS_CC, *flags, f"-I{native}", "-o", str(exe), *map(str, sources), "-lm", "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


@pytest.mark.skipif(
    CROSS_CC is None or QEMU_ARM is None or llama_cpp_flags.platform.machine() != "x86_64",
    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 on an x86-64 host",
)
@pytest.mark.parametrize(
    "cpu,best,paths", [("max", 3, 2), ("cortex-a53", 2, 1)], ids=["arm64-dotprod", "arm64-neon-only"]
)
def test_neon_kernels_match_the_reference_under_qemu_aarch64(neon_check, cpu, best, paths):
    r = subprocess.run(
        [QEMU_ARM, "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", str(neon_check)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.returncode == 0 and not failed, (
        f"{cpu}: rc {r.returncode}\n" + "\n".join(failed[:20]) + r.stderr[-2000:]
    )
    lines = r.stdout.splitlines()
    # -cpu max has dotprod, a Cortex-A53 has not (a dotprod instruction there would be SIGILL, rc -4)
    assert lines[0] == f"best isa {best}", cpu
    assert lines[-1] == f"{paths} paths checked, 0 failures", cpu
    matvecs = [line for line in lines if line.startswith(f"ok   isa {best} matvec")]
    assert len(matvecs) == 21, cpu  # 7 formats x 3 batch sizes on the best path
