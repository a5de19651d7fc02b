"""GGUF files and model families: header reader, model info, auxiliary cuts, OpenELM, CoreNet imports."""
