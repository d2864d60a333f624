"""Two fixes to Triton 3.6's CPU interpreter (TRITON_INTERPRET=1), imported by the scripts that run our
kernels under it; the compiled GPU path is untouched.

- A scalar argument used as a loop bound (`for j in range(n)`) is a 1-element array there, and numpy >= 2.3
  no longer converts those with int(): take its one element.
- tl.dot on bfloat16 multiplies the raw 16-bit patterns (numpy has no bfloat16): widen to float32 first
  (exact) so the product is the one the tensor cores compute.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
import triton.runtime.interpreter as _interp

_patch_tensor = _interp._patch_lang_tensor
_create_dot = _interp.InterpreterBuilder.create_dot


def _patch_lang_tensor(tensor, scope):  # noqa: ANN001 - the interpreter's own signature
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


def _widen(h):  # noqa: ANN001, ANN202 - an interpreter TensorHandle
    if getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16:
        bits = h.data.view(np.uint16).astype(np.uint32) << 16
        return _interp.TensorHandle(bits.view(np.float32), tl.float32)
    return h


def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001, ANN202
    return _create_dot(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)


_interp._patch_lang_tensor = _patch_lang_tensor
_interp.InterpreterBuilder.create_dot = _dot
