"""The one exception hierarchy kvcli raises for problems a user can fix.

The CLI prints ``Error: <message>`` for these and exits non-zero; anything else is a bug
and shows a traceback only with ``--debug``.
"""


class KvcliError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ModelFileError(KvcliError):
    """A model, auxiliary or predictor file is missing, truncated, not GGUF, or unsupported."""


class IncompatibleError(KvcliError):
    """Two files that must belong together do not (tokenizers, fingerprints, layouts)."""


class StateFormatError(KvcliError):
    """llama.cpp's sequence state holds a layout or KV type kvcli cannot read or write."""


class ContextError(KvcliError):
    """A llama.cpp context call failed or the prompt does not fit the context."""
