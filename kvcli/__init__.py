"""kvcli: KV Prediction (Horton et al., arXiv 2410.08391) on llama.cpp for a faster first token."""

__version__ = "0.1.0"
