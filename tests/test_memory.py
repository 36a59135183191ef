"""The server process's heap: frozen out of the collector's walk once the app is built.

These run in a child process: freezing the test runner's own heap would keep every app the
other tests build alive for the rest of the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Prints how many objects are frozen and how many a full collection still walks, before and
# after the factory `chatbot-api serve` hands to uvicorn.
CHILD = """
import gc, json
from chatbot_api import main

before = {"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}
main.app_factory()
gc.collect()
after = {"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}
print(json.dumps({"before": before, "after": after}))
"""


def test_the_served_app_leaves_its_startup_heap_out_of_full_collections(tmp_path: Path) -> None:
    env = {
        "PATH": "",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": "http://127.0.0.1:9/v1",
        "LLM_API_KEY": "test-key",
        "LLM_MODEL": "fake",
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    counts = json.loads(child.stdout)
    assert counts["before"]["frozen"] == 0
    # The imports alone leave tens of thousands of objects; frozen, a full collection walks
    # only what was made after the factory returned.
    assert counts["before"]["walked"] > 20_000
    assert counts["after"]["frozen"] > counts["before"]["walked"]
    assert counts["after"]["walked"] < 1_000
