"""The model store: bundled model, GGUF metadata."""
