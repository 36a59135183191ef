"""chatbot-api: a self-hostable REST + SSE backend for LLM chatbots."""

__version__ = "0.1.0"
