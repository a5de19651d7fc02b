"""llama.cpp's shared library through llama-cpp-python: loaded once with its log silenced
(its last error kept for kvcli's messages, all of it let through with --debug), and what it
is (version, kvcli's patches, CPU features). ``llama_cpp`` is imported lazily so that
``kvcli --help`` stays instant."""

from __future__ import annotations

import ctypes
import os

_LOG_CALLBACK = None

_VERBOSE = False

_LAST_ERROR: list[str] = []  # llama.cpp's last error-level log line, for kvcli's messages

GGML_LOG_LEVEL_ERROR = 4

PATCH_LABEL = "+kvcli."  # tools/install.py builds llama-cpp-python as 0.3.36+kvcli.<patches digest>


def set_verbose(verbose: bool) -> None:
    """Let llama.cpp's own log through to stderr (it is silenced by default)."""
    global _VERBOSE
    _VERBOSE = verbose


def _lib():
    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        @llama_cpp.llama_log_callback
        def _log(level, text, user_data):
            if _VERBOSE:
                os.write(2, text)
            if level == GGML_LOG_LEVEL_ERROR and text and text.strip():
                _LAST_ERROR[:] = [text.decode("utf-8", "replace").strip()]

        _LOG_CALLBACK = _log
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def last_llama_error() -> str:
    """llama.cpp's last logged error line (empty if none), then forget it."""
    out = _LAST_ERROR[0] if _LAST_ERROR else ""
    _LAST_ERROR.clear()
    return out


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "not installed"


def prefix_view_supported() -> bool:
    """Whether this llama-cpp-python was built with kvcli's patches/ (tools/install.py): its
    llama.cpp then loads a model file's first k layers alone (Model(prefix_layers=k))."""
    return PATCH_LABEL in llama_cpp_version()


def system_info() -> str:
    """llama.cpp's build and CPU feature line (llama_print_system_info)."""
    raw = _lib().llama_print_system_info()
    return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()
