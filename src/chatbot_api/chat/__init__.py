"""One chat turn: context -> provider -> persist -> SSE events."""
