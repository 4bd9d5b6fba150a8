"""The OpenAI-compatible HTTP server (`idlm serve`).

Why it exists: clients (the `openai` SDK, curl, load generators, lm-evaluation-harness) talk to idlm
over HTTP with the OpenAI wire format; this package turns those requests into `AsyncLLM` requests and
streams the committed tokens back. `protocol` is the wire format, `app.build_app` makes the FastAPI
app, `runner` runs a request's engine streams (admission, cancellation, shutdown), `middleware`
guards it, `metrics` counts, `launch` holds the CLI plumbing. docs/server.md says what the server
guarantees and how it was measured.
"""

__all__ = ["build_app"]


def __getattr__(name):  # lazy: `idlm --help` must not import FastAPI
    if name == "build_app":
        from idlm.server.app import build_app

        return build_app
    raise AttributeError(name)
