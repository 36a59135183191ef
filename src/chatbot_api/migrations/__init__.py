"""Alembic migrations, shipped inside the package so `chatbot-api migrate` works from a wheel."""
