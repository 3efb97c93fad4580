"""OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn): ``dsv3 serve``.

``create_app`` is imported on first use, so the command line (which registers its subcommands from
``dsv3.serve.cli``) does not pay for FastAPI unless it serves.
"""

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'dsv3.serve' has no attribute {name!r}")
