"""The OpenAI-compatible HTTP server (`idlm serve`).

Why it exists: clients (the `openai` SDK, curl, load generators) talk to idlm over HTTP with the
OpenAI wire format; this package turns those requests into `AsyncLLM.generate` calls and streams the
committed tokens back. `app.build_app` makes the FastAPI app; `launch` holds the CLI plumbing.
"""

__all__ = ["build_app"]


def __getattr__(name):  # lazy: `idlm --help` must not import FastAPI
    if name == "build_app":
        from idlm.server.app import build_app

        return build_app
    raise AttributeError(name)
