"""`medsd serve`: start (or join) Ray, bind the HTTP proxy, run the application."""

from __future__ import annotations

import logging
import socket

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from medsd.config import ServeConfig
from medsd.ray_session import ensure_ray, will_start_local_ray
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
    if will_start_local_ray():
        # A local Ray is about to start, so no proxy of ours holds the port: if it is taken, say so now,
        # not after Ray's proxy has failed its health checks.
        check_port_free(cfg.host, cfg.port)
    ensure_ray()
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    except RayActorError as error:  # the HTTP proxy actor died before it was ready
        raise ConnectionError(
            f"Ray Serve's HTTP proxy for http://{cfg.host}:{cfg.port} did not start ({type(error).__name__}): "
            "the port may be taken, or the machine too busy to start the proxy within Serve's health checks; "
            "retry, or choose another port with --port"
        ) from None
    logger.info("deploying the medsd API at http://%s:%d%s (OpenAPI docs at /docs)", cfg.host, cfg.port, route_prefix)
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)


def check_port_free(host: str, port: int) -> None:
    """OSError naming ``host:port`` when something already listens there (another `medsd serve`, say)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to bind
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(
                f"serve.port: cannot listen on {host}:{port} ({error.strerror}); another server (a second "
                "`medsd serve`?) may hold it: stop it or choose another port with --port"
            ) from None
