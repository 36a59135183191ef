"""Per-key limits: request rate, concurrent generations, daily tokens, and failed-auth
throttling, behind one small `Limiter` interface (in memory, or Redis for several processes)."""
