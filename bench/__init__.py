"""The chatbot-api benchmark suite: `make bench` (see bench/README.md)."""
