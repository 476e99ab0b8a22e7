"""`POST /pooling` (and `/classify`): the HTTP formats POLAR's own client speaks.

Request:  {"model": "...", "input": [polar_string, ...]}   ("input" may also be one string)
Response: {"object": "list", "model": ..., "data": [{"index": i, "object": "pooling",
           "data": reward}, ...], "usage": {"prompt_tokens": n, "total_tokens": n,
           "completion_tokens": 0}}

Each input is a full POLAR string (`p SEP ref <|reward|> p SEP cand [UNUSED_TOKEN_130]`,
docs/format.md, "POLAR strings"), as POLAR's `RewardModelClient` builds it; rewards come
back in input order, and the client (server_type "lmdeploy") reads
`[e["data"] for e in response["data"]]`.

The same client's default server_type "sglang" posts {"model": ..., "text": [...]} to
`/classify` and reads `[e["embedding"][0] for e in response]`: served too, by the same model.

Errors answer with an HTTP status and lmdeploy's error body, {"object": "error", "message":
..., "type": "invalid_request_error", "param": null, "code": status}. (POLAR's client checks
no status: it retries 8 times when the body has no "data", then gives None.)
Also `GET /health` (server statistics) and `GET /v1/models`.

A standard-library threading HTTP server: requests are parsed concurrently, the model runs one
batch at a time (the service's collective). Bodies above the service's `max_text_bytes` are refused
with 413 before they are read.
"""

from __future__ import annotations

import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron_polar.serving.rewards import PolarRewardService, RequestError


class PoolingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: PolarRewardService, host: str = "127.0.0.1", port: int = 23333,
                 model_name: str = "polar"):
        self.service = service
        self.model_name = model_name
        super().__init__((host, port), _Handler)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="polar-pooling", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: PoolingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request is too much under PPO load
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "internal_server_error"
        self._reply(status, {"object": "error", "message": message, "type": kind,
                             "param": None, "code": int(status)})

    def do_GET(self):
        if self.path == "/health":
            self._reply(200, {"status": "ok", **self.server.service.stats()})
        elif self.path == "/v1/models":
            self._reply(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "megatron_polar"}]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self):
        route = self.path.rstrip("/")
        if route not in ("/pooling", "/v1/pooling", "/classify"):
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; POST /pooling")
            return
        field = "text" if route == "/classify" else "input"
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            self.close_connection = True
            return
        limit = self.server.service.limits.max_text_bytes
        if length > limit:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {length} bytes exceeds the server's limit of {limit}")
            self.close_connection = True  # the unread body must not be parsed as a request
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict) or field not in body:
                raise RequestError(f"expected a JSON object with '{field}'")
            texts = body[field]
            if isinstance(texts, str):
                texts = [texts]
            rewards, tokens = self.server.service.score_texts(texts)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._error(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}")
            return
        except RequestError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # the server's fault; it keeps serving
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            return
        if route == "/classify":  # sglang's answer: one object per input
            self._reply(200, [{"index": i, "embedding": [float(r)], "meta_info": {}}
                              for i, r in enumerate(rewards)])
            return
        self._reply(200, {
            "id": f"pooling-{time.time_ns()}", "object": "list", "created": int(time.time()),
            "model": body.get("model") or self.server.model_name,
            "data": [{"index": i, "object": "pooling", "data": float(r)}
                     for i, r in enumerate(rewards)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        })
