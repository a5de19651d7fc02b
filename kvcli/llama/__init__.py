"""Thin owners of llama.cpp's native handles: models, contexts, tensor capture, chat templates."""
