"""``promptkd serve``: a distilled student behind a small HTTP API (FastAPI + uvicorn) and a web page.

Routes (described at ``/docs``, a page that needs no internet; schema at ``/openapi.json``):

* ``GET /``: a single page (plain HTML/JS in ``page.html``, nothing fetched from elsewhere): choose or
  drop an image, see the top-k classes as bars, the model's name and class count;
* ``GET /health``: ``{"status": "ok", "model": {name, backend, precision, num_classes, identity...}}``;
* ``GET /classes``: the class names in label order;
* ``POST /predict``: one or several images as ``multipart/form-data`` (fields ``files`` or ``file``) or
  JSON ``{"images": [{"name": ..., "data": BASE64}, ...] | [BASE64, ...], "top_k": k}``; answers the
  top-k classes with probabilities per image.

Limits (:class:`ServeConfig`): request body size, images per request and pixels per image; a request
over a limit gets 413, a file that is not an image 400, a malformed body 422; each names the upload
and the server keeps serving. Requests are not run one model call each: images wait (at most
``max_wait_ms``) to be batched with other requests' images into one forward pass of at most
``max_batch`` images, one pass at a time; when more than ``max_pending`` images wait, new requests get
503 (retry later) instead of an unbounded queue.
"""


import asyncio
import base64
import binascii
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from promptkd.data.decode import image_size
from promptkd.runtime import Predictor, decode_image


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    top_k: int = 5  # default top-k of /predict (a request may ask for another)
    max_upload_mb: float = 20.0  # whole request body
    max_images: int = 16  # images per request
    max_pixels: int = 40_000_000  # width x height of one image (before resizing)
    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_pending: int = 256  # images waiting or running; beyond: 503

    def validate(self) -> "ServeConfig":
        problems = [f"{name} must be positive (got {getattr(self, name)})"
                    for name in ("top_k", "max_upload_mb", "max_images", "max_pixels", "max_batch", "max_pending")
                    if not getattr(self, name) > 0]
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must be >= 0 (got {self.max_wait_ms})")
        if not 0 <= self.port < 65536:
            problems.append(f"port must be in 0..65535 (got {self.port})")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))
        return self


class RequestError(Exception):
    """A client error: HTTP status + one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Batcher:
    """Collects images from concurrent requests into forward passes of at most ``max_batch`` images.

    The model runs in one worker thread (one pass at a time); the event loop stays free to accept
    and decode other requests meanwhile."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig) -> None:
        self.predictor, self.cfg = predictor, cfg
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptkd-model")
        self.pending = 0
        self.passes = 0
        self.images = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        assert self._queue is not None
        return self._queue

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        n = images.shape[0]
        if self.pending + n > self.cfg.max_pending:
            raise RequestError(503, f"busy: {self.pending} images are waiting (limit {self.cfg.max_pending}); "
                                    "retry shortly")
        queue = self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        self.pending += n
        try:
            await queue.put((images, future))
            return await future
        finally:
            self.pending -= n

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        assert queue is not None
        carry = None  # a request that did not fit into the previous pass
        while True:
            items = [carry if carry is not None else await queue.get()]
            carry = None
            count = items[0][0].shape[0]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while count < self.cfg.max_batch:
                try:
                    if not queue.empty():
                        nxt = queue.get_nowait()
                    elif deadline - loop.time() > 0:
                        nxt = await asyncio.wait_for(queue.get(), deadline - loop.time())
                    else:
                        break
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if count + nxt[0].shape[0] > self.cfg.max_batch:
                    carry = nxt
                    break
                items.append(nxt)
                count += nxt[0].shape[0]
            await self._forward(loop, items)

    async def _forward(self, loop: asyncio.AbstractEventLoop, items: list) -> None:
        batch = torch.cat([images for images, _ in items])
        try:
            probs = await loop.run_in_executor(self.executor, self.predictor.probabilities, batch)
        except Exception as exc:  # the model failed: every waiting request gets a 500, the server keeps going
            for _, future in items:
                if not future.done():
                    future.set_exception(RequestError(500, f"the model failed: {type(exc).__name__}: {exc}"))
            return
        self.passes += 1
        self.images += batch.shape[0]
        start = 0
        for images, future in items:
            n = images.shape[0]
            if not future.done():
                future.set_result(probs[start : start + n])
            start += n


def without_local_paths(value):
    """``value`` with every absolute file path cut to its last part: /health may face a network, and the
    folders of the machine that serves are not its business."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return os.path.basename(value.rstrip("/")) or value
    return value


def page_html() -> str:
    return resources.files("promptkd.server").joinpath("page.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, cfg: ServeConfig | None = None):
    """The FastAPI application serving ``predictor`` (see the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    cfg = (cfg or ServeConfig()).validate()
    batcher = Batcher(predictor, cfg)
    prepare = predictor.preparer()
    info = predictor.info
    started = time.time()
    app = FastAPI(title="promptkd student", version="1", docs_url=None, redoc_url=None,  # theirs load a CDN
                  description=f"{info.name}: a PromptKD student over {len(info.class_names)} classes "
                              f"({info.backend}, {info.precision}). Images in, top-k classes out.")
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_upload_mb * 2**20))
    app.state.batcher = batcher
    app.state.config = cfg

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page_html()

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        from promptkd.server.api_docs import docs_html

        return docs_html(app.openapi())

    @app.get("/health", summary="Server status and the model's identity")
    async def health() -> dict:
        return {"status": "ok", "model": without_local_paths(info.to_json()), "uptime_s": round(time.time() - started, 1),
                "served": {"forward_passes": batcher.passes, "images": batcher.images},
                "limits": asdict(cfg)}

    @app.get("/classes", summary="Class names in label order")
    async def classes() -> dict:
        return {"num_classes": len(info.class_names),
                "classes": [{"label": i, "class_name": n} for i, n in enumerate(info.class_names)]}

    @app.post("/predict", summary="Top-k classes of one or several images", openapi_extra=PREDICT_BODY_DOC)
    async def predict(request: Request, top_k: int | None = None) -> dict:
        t0 = time.perf_counter()
        uploads, body_top_k = await read_uploads(request, cfg)
        k = top_k if top_k is not None else body_top_k if body_top_k is not None else cfg.top_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RequestError(422, f"top_k must be a positive integer, got {k!r}")
        images = await run_in_threadpool(_decode_all, uploads, cfg, prepare)
        probs = await batcher.submit(images)
        tops = predictor.top_k(probs, k)
        return {"model": info.name, "backend": info.backend, "precision": info.precision, "top_k": len(tops[0]),
                "predictions": [{"image": name, "top": [{"label": i, "class_name": n, "probability": round(p, 6)}
                                                         for i, n, p in top]}
                                for (name, _), top in zip(uploads, tops)],
                "time_ms": round(1000 * (time.perf_counter() - t0), 1)}

    return app


PREDICT_BODY_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"oneOf": [
            {"type": "string", "description": "base64 (or a data: URL)"},
            {"type": "object", "properties": {"name": {"type": "string"}, "data": {"type": "string"}}}]}},
        "top_k": {"type": "integer", "minimum": 1}}}},
}}}


async def read_uploads(request, cfg: ServeConfig) -> tuple[list[tuple[str, bytes]], int | None]:
    """(name, bytes) of every image in a multipart or JSON request, and the body's top_k if any."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[tuple[str, bytes]] = []
    top_k: Any = None
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=cfg.max_images + 1, max_fields=32)
        except Exception as exc:  # starlette's MultiPartException and parser errors
            raise RequestError(422 if "many" not in str(exc).lower() else 413,
                               f"malformed multipart body: {exc}") from exc
        files = [f for key in ("files", "file", "image", "images") for f in form.getlist(key)]
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise RequestError(422, f"form field #{i + 1} is text, not a file upload")
            uploads.append((f.filename or f"upload-{i + 1}", await f.read()))
        if form.get("top_k") not in (None, ""):
            top_k = _int(form.get("top_k"))
    elif ctype == "application/json":
        try:
            body = await request.json()
        except Exception as exc:
            raise RequestError(422, f"the JSON body does not parse: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("images"), list):
            raise RequestError(422, 'the JSON body must be {"images": [BASE64 or {"name", "data"}...], "top_k": k}')
        for i, item in enumerate(body["images"]):
            name, data = (item.get("name") or f"image-{i + 1}", item.get("data")) if isinstance(item, dict) \
                else (f"image-{i + 1}", item)
            if not isinstance(data, str):
                raise RequestError(422, f"{name}: 'data' must be a base64 string")
            uploads.append((str(name), _b64(data, str(name))))
        top_k = body.get("top_k")
    else:
        raise RequestError(415, f"send images as multipart/form-data or application/json, not {ctype or 'no type'!r}")
    if not uploads:
        raise RequestError(400, "no image in the request (multipart field 'files', or JSON 'images')")
    if len(uploads) > cfg.max_images:
        raise RequestError(413, f"{len(uploads)} images in one request; the limit is {cfg.max_images}")
    return uploads, top_k


def _int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _b64(data: str, name: str) -> bytes:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(422, f"{name}: not valid base64 ({exc})") from exc


def _decode_all(uploads: list[tuple[str, bytes]], cfg: ServeConfig, prepare) -> torch.Tensor:
    from PIL import Image

    images = []
    for name, data in uploads:
        if not data:
            raise RequestError(400, f"{name}: empty upload")
        try:
            width, height = image_size(io.BytesIO(data))  # header only: size before decoding pixels
        except Image.UnidentifiedImageError as exc:
            raise RequestError(400, f"{name}: not an image (Pillow does not recognise its format)") from exc
        except Exception as exc:
            raise RequestError(400, f"{name}: not an image ({type(exc).__name__}: {exc})") from exc
        if width * height > cfg.max_pixels:
            raise RequestError(413, f"{name}: {width}x{height} = {width * height:,} pixels; the limit is "
                                    f"{cfg.max_pixels:,} (--max-pixels)")
        try:
            images.append(decode_image(data, name, max_pixels=cfg.max_pixels, setting="--max-pixels"))
        except ValueError as exc:
            raise RequestError(400, str(exc)) from exc
    return prepare(images)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app parses any of it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send, int(length))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, None)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send, length: int | None) -> None:
        import json

        got = f"{length:,} bytes" if length is not None else "more than the limit"
        payload = json.dumps({"detail": f"request body too large: {got}; the limit is {self.max_bytes:,} bytes "
                                        f"({self.max_bytes / 2**20:g} MiB, --max-upload-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def serve(model: str, cfg: ServeConfig, *, precision: str = "auto", device: str = "cpu", threads: int = 0,
          check_images: str | None = None, log_level: str = "info", backend: str = "auto",
          **builder_options) -> None:
    """Load ``model`` (student folder, bundle or ONNX file) and serve it with uvicorn until interrupted."""
    import uvicorn

    from promptkd.runtime import expand_inputs, load_predictor

    cfg.validate()
    paths = expand_inputs([check_images]) if check_images else []
    predictor = load_predictor(model, precision=precision, device=device, threads=threads, check_paths=paths,
                               backend=backend, expected_images=None, check_limit=256, **builder_options)
    for note in predictor.info.notes:
        print(f"note: {note}", flush=True)
    info = predictor.info
    print(f"serving {info.name} ({len(info.class_names)} classes, {info.backend} {info.precision}) on "
          f"http://{cfg.host}:{cfg.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(create_app(predictor, cfg), host=cfg.host, port=cfg.port, log_level=log_level)
