"""Build of ripelm's native CPU kernels (kernels/native, loaded with ctypes by ripelm.kernels.native_lib).

Everything else about the package is in pyproject.toml. The library is compiled without -march: its
vector kernels carry their own target attributes and are chosen at run time by the CPU's features, so a
wheel built on one machine runs on any x86-64 or ARM64 CPU. The extension is optional: where it cannot
be built, ripelm runs on torch alone and says so once.
"""

from setuptools import Extension, setup

NATIVE = "kernels/native/"

setup(
    ext_modules=[
        Extension(
            "ripelm.kernels._ripe_native",
            sources=[
                NATIVE + f
                for f in (
                    "decode_step.c",
                    "repack.c",
                    "kernels_ref.c",
                    "kernels_avx2.c",
                    "kernels_vnni.c",
                    "kernels_neon.c",
                    "shortlist.c",
                )
            ],
            depends=[NATIVE + f for f in ("ripe_native.h", "x86_helpers.h", "x86_int8_dots.inc")],
            extra_compile_args=["-O3", "-std=c11", "-D_GNU_SOURCE", "-fno-strict-aliasing"],
            libraries=["m"],
            optional=True,
        )
    ]
)
