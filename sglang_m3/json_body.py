"""The chat route's body before SGLang reads it: a JSON body that is not an object gets HTTP 400 naming its type.

Why: SGLang 0.5.17's ChatCompletionRequest "before" validators call ``values.get`` on the raw body, so `[1,2]`, `"x"`
or `null` raised AttributeError inside pydantic and came back as HTTP 500. ASGI middleware (`JsonObjectBody`),
installed by plugin.py in front of SGLang's routes.
"""

from __future__ import annotations

import json
import re
from typing import Optional


# the routes whose handlers read a ChatCompletionRequest (SageMaker's /invocations too)
JSON_OBJECT_ROUTES = ("/v1/chat/completions", "/invocations")
_LEADING_WS = re.compile(rb"[ \t\r\n]*")


_JSON_OPENERS = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null",
                 "-": "number", **{d: "number" for d in "0123456789"}}
SCALAR_PARSE_LIMIT = 1 << 20  # bytes: a body opening as a string, number, true/false/null is parsed up to this size


def json_kind(body: bytes) -> Optional[str]:
    """The JSON type an HTTP body holds ("object", "array", "string", "number", "boolean", "null"), or None when it
    is not JSON (SGLang answers such a body itself, with its own 400).

    The encoding is detected as json.loads detects it (UTF-8/16/32, a byte-order mark) and the kind read from the
    first non-whitespace character: an object or an array is not parsed (an array nested 100,000 deep made
    json.loads raise RecursionError, a 500, and a 40 MB array held the event loop ~3 s: session 19's newcomer
    probe); so a body that opens an array but is not valid JSON counts as an array. A scalar is parsed (up to
    SCALAR_PARSE_LIMIT bytes), so that text such as `nope` is left to SGLang's parse error."""
    try:
        encoding = json.detect_encoding(body[:4])
    except LookupError:
        return None
    if encoding.startswith("utf-8"):  # (the usual case: no copy of the body; any amount of leading whitespace)
        at = _LEADING_WS.match(body).end()
        if body.startswith(b"\xef\xbb\xbf", at):
            at = _LEADING_WS.match(body, at + 3).end()
        first = body[at:at + 1].decode("latin-1")
    else:
        first = body.decode(encoding, errors="ignore").lstrip(" \t\r\n\ufeff")[:1]
    kind = _JSON_OPENERS.get(first)
    if kind in (None, "object", "array") or len(body) > SCALAR_PARSE_LIMIT:
        return kind
    try:
        json.loads(body)
    except ValueError:
        return None
    return kind


class JsonObjectBody:
    """ASGI middleware: a POST to a route of JSON_OBJECT_ROUTES whose body is JSON but not an object gets HTTP 400
    naming what it got (see the module docstring for why). The body is read once and handed on unchanged (an object
    or array body is never parsed here, see json_kind); responses (streams included) pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in JSON_OBJECT_ROUTES:
            return await self.app(scope, receive, send)
        chunks, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        kind = json_kind(body)
        if kind not in (None, "object"):
            payload = json.dumps({"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                                  "message": f"The request body must be a JSON object; got a JSON {kind}."}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
