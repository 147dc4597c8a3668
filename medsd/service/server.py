"""`medsd serve`: start (or join) Ray, bind the HTTP proxy, run the application."""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from medsd.config import ServeConfig
from medsd.ray_session import ensure_ray
from medsd.service.deployments import build_app

logger = logging.getLogger(__name__)

APP_NAME = "medsd"
ROUTE_PREFIX = "/"


def run_server(
    cfg: ServeConfig, *, blocking: bool = True, name: str = APP_NAME, route_prefix: str = ROUTE_PREFIX
) -> DeploymentHandle:
    """Deploy the API on http://cfg.host:cfg.port; with ``blocking``, serve until interrupted.

    HTTP options are fixed when Serve first starts on a cluster: a Serve already running keeps its own.
    """
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    logger.info("deploying the medsd API at http://%s:%d%s (OpenAPI docs at /docs)", cfg.host, cfg.port, route_prefix)
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)
