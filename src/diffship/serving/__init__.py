"""Serving an exported pipeline over HTTP with Ray Serve (`diffship serve`, or `serve run` / `serve deploy` with
`diffship.serving:build_app`). Ray is imported only when an application is built: `import diffship.serving` and
its request checks work without it.

    serve run diffship.serving:build_app model_dir=/models/sd-onnx max_batch_size=4
"""

from __future__ import annotations

from diffship.serving.options import SERVE_INSTALL_HINT, ServeOptions, check_model_dir, options_from_args


def build_app(args: dict):
    """Ray Serve application builder: `args` are ServeOptions' fields (a config file's `args:`, or `serve run`'s
    key=value pairs); `host`, `port` and `address` are the config file's `http_options` there, not read here."""
    options = options_from_args(args)
    # The node that builds the application (a cluster's head) need not hold the model: the replicas load it where
    # they run, and say so when it is missing. Where it is here, it is checked now.
    options.backend = check_model_dir(options.model_dir, options.backend, must_exist=False)
    return _app_module().build(options)


def _app_module():
    try:
        from diffship.serving import app
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("ray", "fastapi", "starlette", "prometheus_client"):
            raise
        from diffship.errors import DiffshipError

        raise DiffshipError(f"serving needs Ray Serve ({e.name} is not installed): {SERVE_INSTALL_HINT}") from None
    return app


__all__ = ["ServeOptions", "build_app"]
