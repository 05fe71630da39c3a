"""``deltatune serve``: one base model, many adapters, OpenAI's API, mixed batches per request.

``Engine`` and ``Adapters`` need only torch; ``deltatune.serve.app.create_app`` adds the HTTP
routes (FastAPI)."""

from .adapters import Adapters
from .engine import Engine, Sequence

__all__ = ["Adapters", "Engine", "Sequence"]
