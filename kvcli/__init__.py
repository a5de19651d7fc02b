"""kvcli: KV Prediction (Horton et al., arXiv 2410.08391) on llama.cpp for a faster first token."""

import os

# numpy's OpenBLAS workers spin for a while after each matrix product and then fight
# llama.cpp's threads for the cores: measured at pp1024 on 2 cores, the base's one-token
# decode right after the predict step took 87 ms with threaded BLAS and 23 ms without
# (predict itself 53 -> 67 ms). Must be set before numpy is first imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"


def load(*args, **kwargs):
    """A bundle ready to ``generate`` and ``chat``: kvcli.api.load (imported on first call, so
    that ``import kvcli`` stays cheap)."""
    from kvcli.api import load as load_model

    return load_model(*args, **kwargs)
