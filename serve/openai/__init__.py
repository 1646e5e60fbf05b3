"""The OpenAI-compatible HTTP API: request schema, images, errors and response shapes."""
