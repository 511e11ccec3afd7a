"""Upstream engines: OpenAI-compatible and native Ollama servers, replicas, managed children."""
