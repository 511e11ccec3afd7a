"""The OpenAI dialect: schemas, pure converters, thin routes."""
