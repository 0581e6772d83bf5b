"""`llamalab serve`: an OpenAI-compatible HTTP server with a chat page.

Layers, top down: ``llamalab.cli.serve`` (the command: load, build, run uvicorn) →
`app` (routes, error bodies, streaming, request limits) → `scheduler` (one thread that
owns the `Engine` and batches requests continuously) → ``llamalab.generation`` (the one
generation loop). `schemas` holds the pydantic request and response models; `launch`
starts a server process for tests and benchmarks. The core never imports this package.
"""
