"""One module per scenario of the benchmark issue; each exposes `async def run(b: Bench)`."""
