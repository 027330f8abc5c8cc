"""Structured logging: one JSON object per line, with the request id when there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import time

__all__ = ["JsonFormatter", "configure_logging", "request_id_var"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("lokr_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "info", as_json: bool = True) -> None:
    """Called by the CLI only (never at import)."""
    handler = logging.StreamHandler()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(fmt))
    root = logging.getLogger("lokr_serve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    server = logging.getLogger("uvicorn")  # its errors (and tracebacks) in the same JSON lines; uvicorn is told
    server.handlers[:] = [handler]  # not to configure logging itself (`log_config=None`)
    server.setLevel(logging.WARNING)
    server.propagate = False
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars would break the log's lines
    # diffusers' bars are turned off where a pipeline is loaded (`images.load`): importing it here cost every
    # causal-LM server 3 s of start-up
