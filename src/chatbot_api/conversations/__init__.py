"""Conversations and their messages: storage, schemas, service and routes."""
