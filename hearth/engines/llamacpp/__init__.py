"""The in-box engine: llama.cpp in a worker process, batched."""
