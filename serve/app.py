"""Ray Serve entry point: `serve run serve.app:app`, `serve build serve.app:app`, `serve deploy serve/config.yaml`.

A thin adapter: the deployments live in medsd.service.deployments so that `medsd serve` runs the same app.
Another model or settings: `import_path: serve.app:app_builder` with `args:` holding a ServeConfig.
"""

from ray.serve import Application

from medsd.config import ServeConfig
from medsd.service.deployments import build_app


def app_builder(args: ServeConfig) -> Application:
    """Typed builder: Serve validates the config file's `args` into a ServeConfig."""
    return build_app(args)


app = app_builder(ServeConfig())
