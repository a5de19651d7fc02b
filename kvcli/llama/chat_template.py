"""Chat templates through llama.cpp's own ``llama_chat_apply_template``: the one a model's
GGUF stores, and llama.cpp's built-in ones by name."""

from __future__ import annotations

import ctypes

from kvcli.errors import ContextError
from kvcli.llama.library import _lib
from kvcli.llama.runtime import Model

# llama.cpp's built-in template per architecture, for a GGUF that stores none
ARCH_TEMPLATES = {"gemma3": "gemma", "qwen2": "chatml", "llama": "llama2", "openelm": "llama2"}


def model_chat_template(model: Model) -> str | None:
    """The chat template stored in the model's GGUF (``tokenizer.chat_template``), if any."""
    raw = model._lib.llama_model_chat_template(model.handle, None)
    return raw.decode("utf-8", "replace") if raw else None


def chat_template_for(model: Model, arch: str) -> str:
    """The model's own template, else llama.cpp's built-in one for its architecture."""
    return model_chat_template(model) or ARCH_TEMPLATES.get(arch, "chatml")


def builtin_chat_templates() -> list[str]:
    lib = _lib()
    n = lib.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    lib.llama_chat_builtin_templates(names, n)
    return [x.decode() for x in names]


def apply_chat_template(template: str, messages: list[dict], add_assistant: bool = True) -> str:
    """Render ``messages`` ({role, content}) with llama.cpp's own ``llama_chat_apply_template``:
    a built-in template's name, or a template text llama.cpp recognises."""
    lib = _lib()
    encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (lib.llama_chat_message * len(encoded))(*[lib.llama_chat_message(r, c) for r, c in encoded])
    size = 4 * sum(len(c) + 32 for _, c in encoded) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(template.encode(), chat, len(encoded), add_assistant, buf, size)
        if n < 0:
            raise ContextError(
                f"llama.cpp does not know the chat template {template[:40]!r} "
                f"(built in: {', '.join(builtin_chat_templates())})"
            )
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1
    raise ContextError("the chat template grew while rendering")
