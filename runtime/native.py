"""Loading a GGUF model for our engine: the weights (repacked for the native step, or as torch tensors), the
tokenizer, the chat template and a guard on the file. `runtime.engine.Engine` runs what this loads; the
single-sequence contiguous-cache backend the engine was once checked against lives with the tests
(tests/native_reference.py).
"""

from __future__ import annotations

from pathlib import Path

from ripelm.models.file_guard import COPY_AT_LOAD_MAX_BYTES, FileState, ModelFileGuard
from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.runtime.chat_template import ChatTemplate
from ripelm.runtime.device import bound_heap_growth, compute_dtype, pick_device, release_free_memory
from ripelm.runtime.loader import check_supported, load_native_transformer, load_transformer, run_context
from ripelm.runtime.native_decode import NativeWeights, notice_once
from ripelm.runtime.tokenizer import Tokenizer


def load_native(
    backend,
    model_path: str | Path,
    *,
    device: str | None,
    n_ctx: int | None,
    tokenizer: Tokenizer | None,
    reference: bool,
    gguf: GGUFFile | None,
) -> None:
    """Load a GGUF model onto `backend`: its path, gguf, file_guard, model, cfg, device, context, tokenizer,
    template. On the native step nothing of the file is kept (its weights are repacked, the file closed);
    otherwise a file up to COPY_AT_LOAD_MAX_BYTES is copied into memory first. Either way truncating the
    file later cannot fault, and `file_guard.check()` before each request reports any change."""
    bound_heap_growth()
    backend.path = Path(model_path)
    backend.gguf = gguf or open_gguf(backend.path)
    backend.file_guard = ModelFileGuard(backend.path, backend.gguf.state or _state_now(backend.path))
    backend.torch_device = pick_device(device)
    backend.device = str(backend.torch_device)
    dtype = compute_dtype(backend.torch_device)
    native = None
    supported = check_supported(backend.gguf)
    context_length = run_context(supported, n_ctx)
    if not reference:
        # The native step's repacked weights become the model's only copy; nothing reads the file after.
        native = NativeWeights.pack(backend.gguf, supported, backend.torch_device)
        if native is None and backend.torch_device.type == "cpu":
            notice_once()
    if native is not None:
        backend.model = load_native_transformer(
            backend.gguf, native, dtype=dtype, context_length=context_length
        )
        backend.gguf.close()  # unmapped: nothing reads the file again, so no page of it stays resident
    else:
        if backend.gguf.file_size <= COPY_AT_LOAD_MAX_BYTES:
            backend.gguf.load_into_memory()
        backend.model = load_transformer(
            backend.gguf,
            device=backend.torch_device,
            dtype=dtype,
            reference=reference,
            context_length=context_length,
        )
    backend.dtype = backend.model.dtype
    release_free_memory()
    cfg = backend.model.cfg
    backend.cfg = cfg
    backend.context_length = context_length
    backend.tokenizer = tokenizer or Tokenizer(backend.path)
    backend.template = ChatTemplate(
        cfg.chat_template, bos_token=backend.tokenizer.bos_text, eos_token=backend.tokenizer.eos_text
    )


def _state_now(path: Path) -> FileState:
    return FileState.of(path.stat())


class LoadedModel:
    """A GGUF model loaded for the engine (see `load_native`): path, gguf, file_guard, model, cfg, device,
    torch_device, dtype, context_length, tokenizer, template."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        n_ctx: int | None = None,
        tokenizer: Tokenizer | None = None,
        reference: bool = False,
        gguf: GGUFFile | None = None,
    ):
        """`reference=True` loads the exact float32 model (dequantized weights) that tests compare to."""
        load_native(
            self, model_path, device=device, n_ctx=n_ctx, tokenizer=tokenizer, reference=reference, gguf=gguf
        )

    def close(self) -> None:
        self.gguf.close()
        self.file_guard.close()
