"""llama.cpp's sequence state: its bytes, its per-layer K and V, RoPE on cached keys, f16 rows."""
