"""The FastAPI app of the ingress: routes, the API-key and body-size guard, readable errors, the web page.

Ray-free: it talks to the generator through a :class:`GenerationBackend`, so the Serve deployment
supplies one backed by a DeploymentHandle and nothing here knows about Ray.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medsd.config import ServeConfig
from medsd.labels import CHEXPERT_OBSERVATIONS, NO_FINDING, PROJECTIONS, VIEWS
from medsd.service.batching import GenerationJob, JobResult
from medsd.service.responses import PNG_MEDIA_TYPE, json_body, png_headers, response_headers
from medsd.service.schema import (
    API_VERSION,
    MAX_SEED,
    Catalog,
    ErrorResponse,
    FieldError,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    LabelsResponse,
)
from medsd.service.validation import InvalidRequest, problems_from_validation_errors, resolve_request

logger = logging.getLogger(__name__)

PAGE_FILE = Path(__file__).with_name("static") / "index.html"
HEALTH_PATH = "/healthz"  # the one route open without the API key: load balancers probe it
API_KEY_HEADER = "x-api-key"
AUTH_REALM = "medsd"
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "API key missing or wrong (only when the server has one)"),
        (413, "request body too large"),
        (422, "a field is invalid; the message names it"),
        (503, "overloaded; retry after the Retry-After header's seconds"),
    )
}


class ServiceOverloaded(RuntimeError):
    """The generators' queue is full: answer 503 with Retry-After instead of queueing forever."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the generator queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class GenerationBackend(Protocol):
    """What the API needs from the generators."""

    async def describe(self) -> Catalog: ...

    async def generate(self, job: GenerationJob) -> JobResult: ...


def build_api(backend: GenerationBackend, cfg: ServeConfig, api_key: str | None) -> FastAPI:
    """The HTTP API over ``backend``; ``api_key`` (None: open) guards every route but /healthz."""
    app = FastAPI(
        title="medsd",
        version=API_VERSION,
        description="Synthetic chest radiographs from a Stable Diffusion model. Every image is synthetic: "
        "its PNG text chunks say synthetic=true and how it was made.",
    )
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=cfg.max_body_bytes)
    _add_error_handlers(app)
    page = PAGE_FILE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def web_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get(HEALTH_PATH, response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse()

    @app.get(f"/{API_VERSION}/labels", response_model=LabelsResponse, responses=ERROR_RESPONSES)
    async def labels() -> LabelsResponse:
        return LabelsResponse(
            observations=list(CHEXPERT_OBSERVATIONS),
            no_finding=NO_FINDING,
            views=list(VIEWS),
            projections=list(PROJECTIONS),
        )

    @app.get(f"/{API_VERSION}/models", response_model=Catalog, responses=ERROR_RESPONSES)
    async def models() -> Catalog:
        return await backend.describe()

    @app.post(
        f"/{API_VERSION}/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {PNG_MEDIA_TYPE: {}}, "description": "image/png (format png) or JSON"}}
        | ERROR_RESPONSES,
    )
    async def generate(request: GenerateRequest) -> Response:
        catalog = await backend.describe()
        job = resolve_request(request, catalog, cfg, draw_seed)
        result = await backend.generate(job)
        if request.format == "png":
            return Response(result.images[0].png, media_type=PNG_MEDIA_TYPE, headers=png_headers(job, result, catalog))
        body = json_body(job, result, catalog)
        return JSONResponse(body.model_dump(mode="json"), headers=response_headers(job, result, catalog))

    return app


def draw_seed() -> int:
    """Seed of a request that gives none; it is returned with the images so they can be made again."""
    return secrets.randbelow(MAX_SEED + 1)


def error_response(
    status: int, detail: str, errors: list[FieldError] = (), headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(detail=detail, errors=list(errors))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is an ErrorResponse; malformed input is 4xx, never 5xx."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, error: RequestValidationError) -> JSONResponse:
        invalid = InvalidRequest(problems_from_validation_errors(error.errors()))
        return error_response(422, str(invalid), invalid.field_errors())

    @app.exception_handler(InvalidRequest)
    async def invalid_request(_request: Request, error: InvalidRequest) -> JSONResponse:
        return error_response(422, str(error), error.field_errors())

    @app.exception_handler(ServiceOverloaded)
    async def overloaded(_request: Request, error: ServiceOverloaded) -> JSONResponse:
        return error_response(503, str(error), headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        return error_response(500, "internal error; the server log has the details")


class RequestGuard:
    """ASGI middleware: API key on every route but /healthz (401), body size cap (413).

    The body is read here, bounded, and replayed to the app, so an oversized or endless body never
    reaches JSON parsing.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.api_key and _relative_path(scope) != HEALTH_PATH and not is_authorized(headers, self.api_key):
            detail = f"missing or wrong API key: send it as the {API_KEY_HEADER} header or a Bearer token"
            response = error_response(401, detail, headers={"WWW-Authenticate": f'Basic realm="{AUTH_REALM}"'})
            await response(scope, receive, send)
            return
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body over {self.max_body_bytes} bytes"
        await error_response(413, detail, [FieldError(field="body", message=detail)])(scope, receive, send)


def is_authorized(headers: dict[str, str], api_key: str) -> bool:
    """The key as X-API-Key, a Bearer token, or the password of HTTP Basic (what a browser prompts for)."""
    candidates = [headers.get(API_KEY_HEADER, "")]
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(credentials.strip())
    elif scheme.lower() == "basic":
        try:
            candidates.append(base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    expected = api_key.encode()
    # compare_digest: the time taken does not reveal how much of a guess was right.
    return any(hmac.compare_digest(candidate.encode(), expected) for candidate in candidates if candidate)


def _relative_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve mounts apps under one)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
