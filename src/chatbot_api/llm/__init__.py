"""The LLM layer: an internal library that imports neither FastAPI nor the database."""
