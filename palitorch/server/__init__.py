"""`palitorch serve`: an OpenAI-style HTTP API over a Pipeline, with dynamic batching of concurrent requests.

    from palitorch.server import Engine, Server
    server = Server(("127.0.0.1", 8000), model_id="paligemma")
    server.engine = Engine(palitorch.load(path)).start()
    server.serve_forever()
"""

from palitorch.server.engine import Engine
from palitorch.server.http import Server
from palitorch.server.jobs import Job
from palitorch.server.openai import ApiError, ChatRequest, parse_chat

__all__ = ["ApiError", "ChatRequest", "Engine", "Job", "Server", "parse_chat"]
