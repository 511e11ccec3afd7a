"""The Ollama dialect: schemas, pure converters, thin routes."""
