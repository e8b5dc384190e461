"""`mnist-cnn serve`: a page to draw a digit on, and a JSON API, on FastAPI.

    GET  /              the drawing page (static/index.html)
    POST /api/predict   multipart field `image` → {"prediction": 7, "probabilities": [10 floats]}
    GET  /api/health    {"status": "ok", "version": ..., "model": which model answers, in words}
    GET  /openapi.json  the API's OpenAPI schema (FastAPI writes it from the code below)

Bad input gets a 4xx JSON error ({"detail": "..."}), never a 500: uploads are capped in bytes
before they are read, images in pixels before they are decoded.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from mnist_cnn import __version__
from mnist_cnn.predict import Classifier
from mnist_cnn.preprocess import ImageError, preprocess

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
MAX_SIDE = 4096  # pixels, either side
IMAGE_HELP = ("PNG, JPEG, BMP, GIF or WebP; dark ink on light paper or light on dark; "
              "at most 2 MB and 4096 px a side")


class PredictionOut(BaseModel):
    prediction: int = Field(description="the most probable digit", ge=0, le=9)
    probabilities: list[float] = Field(description="probability of each digit 0–9",
                                       min_length=10, max_length=10)


class ErrorOut(BaseModel):
    detail: str


TOO_LARGE = f"upload too large (limit {MAX_UPLOAD_BYTES:,} bytes)"


class LimitBody:
    """ASGI middleware that refuses a request body over `limit` bytes with 413: by its
    Content-Length before anything reads it, or, sent without one (chunked), as soon as the
    bytes received pass the limit; else the form parser would spool all of it to disk first."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await JSONResponse({"detail": TOO_LARGE}, 413)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # Raised to the reader (the form parser): FastAPI answers it as any HTTPException.
                raise HTTPException(413, TOO_LARGE)
            return message

        await self.app(scope, counted_receive, send)


def create_app(classifier: Classifier) -> FastAPI:
    app = FastAPI(
        title="mnist-cnn",
        version=__version__,
        description="Classify a handwritten digit. Draw one at `/`, or POST an image to "
        "`/api/predict`.",
    )

    app.add_middleware(LimitBody, limit=MAX_UPLOAD_BYTES + 4096)  # the image and the form's

    @app.exception_handler(RequestValidationError)
    async def no_image(request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer is a list of pydantic's findings; every error of this API is
        # {"detail": "..."}, and the only thing a request can get wrong here is the image field.
        found = "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse(
            {"detail": f"send the image as a file in the multipart form field 'image' ({found})"},
            422)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "model": classifier.about}

    @app.post(
        "/api/predict",
        response_model=PredictionOut,
        responses={400: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
        summary="Classify the digit in an image",
    )
    def predict(image: Annotated[UploadFile, File(description=IMAGE_HELP)]) -> PredictionOut:
        data = image.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, TOO_LARGE)
        try:
            digit = preprocess(data, MAX_SIDE)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        probs = classifier.probabilities(digit[None])[0]
        return PredictionOut(prediction=int(probs.argmax()),
                             probabilities=[round(float(p), 6) for p in probs])

    return app


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on host:port, one per address the host names (localhost is often both
    127.0.0.1 and ::1). Bound here rather than by uvicorn so that an address in use or an
    unknown host raises OSError for the caller to report before serving: uvicorn logs such an
    error among its start-up lines, and under this command it was seen not to exit. An address
    this machine cannot have (::1 where IPv6 is off) is passed over if another one binds."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    unavailable: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as e:  # the family itself is off
                unavailable = e
                continue
            socks.append(sock)
            if os.name == "posix":  # restart without waiting (on Windows it would share a port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # IPv4 has its own socket when the host names both
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise  # in use, or not allowed: the caller says so
                socks.pop().close()
                unavailable = e
                continue
            sock.listen(2048)
        if not socks:
            raise unavailable or OSError(f"{host} names no address")
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def run(classifier: Classifier, socks: list[socket.socket]) -> None:
    """Serve the app on the sockets from `listen` until Ctrl-C (a normal end, not an error)."""
    import uvicorn

    try:
        uvicorn.Server(uvicorn.Config(create_app(classifier), log_level="info")).run(sockets=socks)
    except KeyboardInterrupt:
        pass
