"""The Python API (kvcli.api.local_model): ``kvcli.load()`` and what its calls return."""

from kvcli.api.local_model import Completion, CompletionStream, CompletionTimings, LocalModel, Usage, load

__all__ = ["Completion", "CompletionStream", "CompletionTimings", "LocalModel", "Usage", "load"]
