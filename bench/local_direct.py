"""The embedded model's baseline: llama-cpp-python called directly, in its own process, on the
same GGUF file, with the same context size, threads, chat template and sampling settings as
the app's `LocalProvider`, and greedy decoding so both produce the same tokens.

One JSON request per line on stdin, `{"messages": [...], "max_tokens": N}`; one JSON line
on stdout: tokens generated, and the monotonic times of the first and last token.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time
from typing import Any

# The app's LocalProvider defaults (chatbot_api/llm/local.py).
TOP_P = 0.9
REPEAT_PENALTY = 1.1


def main() -> None:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from chatbot_api.llm.local import default_model_path  # only to locate the GGUF file

    n_ctx = int(os.environ.get("LLM_LOCAL_N_CTX", "4096"))
    threads = int(os.environ.get("LLM_LOCAL_N_THREADS", max(1, (os.cpu_count() or 1) - 1)))
    llama = llama_cpp.Llama(
        model_path=str(default_model_path()),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    eos, bos = (
        llama.detokenize([t], special=True).decode() if t >= 0 else ""
        for t in (llama.token_eos(), llama.token_bos())
    )
    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos
    )
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    sys.stdout.write(json.dumps({"ready": True, "threads": threads, "n_ctx": n_ctx}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        formatted = formatter(messages=request["messages"])
        prompt = llama.tokenize(
            formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started = time.monotonic()
        first: float | None = None
        last = started
        tokens = 0
        text: list[str] = []
        for token in llama.generate(
            prompt, temp=0.0, top_p=TOP_P, repeat_penalty=REPEAT_PENALTY, reset=True
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            tokens += 1
            piece = decoder.decode(llama.detokenize([token]))
            last = time.monotonic()
            if first is None:
                first = last
            text.append(piece)
            if tokens >= request["max_tokens"]:
                break
        result: dict[str, Any] = {
            "tokens": tokens,
            "prompt_tokens": len(prompt),
            "started": started,
            "first": first,
            "last": last,
            "text": "".join(text),
        }
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
