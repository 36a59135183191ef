"""Test helpers that ship with the package, so that the test-suite, real-uvicorn tests and
benchmarks share them: `FakeLLM`, a scriptable OpenAI-compatible server (see `fake_llm`).

The names are imported lazily, so that `python -m chatbot_api.testing.fake_llm` does not find
its own module already imported by the package (runpy warns about that). Type checkers see
plain imports, so a misspelt name is still an error.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FakeLLM", "RecordedRequest", "Script", "unreachable_url"]

if TYPE_CHECKING:
    from chatbot_api.testing.fake_llm import FakeLLM, RecordedRequest, Script, unreachable_url
else:

    def __getattr__(name: str) -> Any:
        if name in __all__:
            return getattr(importlib.import_module("chatbot_api.testing.fake_llm"), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
