"""The Ray Serve application: an ingress deployment that speaks HTTP and a model deployment that generates.

    HTTP -> Ray Serve proxy -> DiffshipIngress (1 replica, no model: FastAPI routes, request checks, metrics)
                                  -> DeploymentHandle -> DiffshipModel (N replicas or autoscaled; each loads the
                                     exported pipeline once and runs @serve.batch batches through it)

Why two deployments: a request is checked (400 naming the field) before it reaches a model replica, so bad input
costs no model time; the ingress sees every request, so its metrics are the application's; and a model replica that
dies mid-request is seen by the ingress as an error on its handle call, which it retries once on another replica
and otherwise answers (503), never leaving the client waiting. The model deployment's queue is bounded by Ray
Serve (max_ongoing_requests per replica, max_queued_requests in all): past it the handle raises BackPressureError
and the ingress answers 503 with Retry-After.

Imported only where Ray is installed (`diffship serve`, the application builder); `import diffship` never imports it.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from diffship.errors import DiffshipError
from diffship.serving.metrics import CONTENT_TYPE, ServerMetrics
from diffship.serving.model import ServedModel
from diffship.serving.options import (
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    RETRY_AFTER_S,
    ServeOptions,
)
from diffship.serving.requests import B64_JSON, RequestError, parse_generate, parse_openai

logger = logging.getLogger("diffship.serving")

# A request whose model replica died is sent once more (to a live replica: Ray routes around the dead one); the
# image is the same, as the seed was fixed at the ingress.
MAX_ATTEMPTS = 2
# The ingress holds requests while they wait for the model deployment, which bounds the queue; its own bound only
# keeps a flood of connections from exhausting it.
INGRESS_MAX_ONGOING_REQUESTS = 1000
# How long /ready waits for a model replica to answer.
READY_TIMEOUT_S = 5.0
# The proxy's own timeout (408) is a backstop behind the ingress's 504: it also covers time before the ingress.
PROXY_TIMEOUT_MARGIN_S = 30.0

api = FastAPI(title="diffship", description="Image generation with an exported diffusion pipeline (diffship).")


class _Answer(Exception):
    """An error response: status, OpenAI-style error body, metrics kind, headers."""

    def __init__(self, status: int, message: str, kind: str, param=None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}

    def response(self) -> JSONResponse:
        error_type = "invalid_request_error" if self.status == 400 else self.kind
        return JSONResponse({"error": {"message": str(self), "type": error_type, "param": self.param,
                                       "code": None}}, status_code=self.status, headers=self.headers)


def _model_replicas() -> dict:
    """The model deployment's replicas by state (RUNNING, STARTING, ...), as Serve's controller reports them."""
    context = serve.get_replica_context()
    application = serve.status().applications[context.app_name]
    return dict(application.deployments[MODEL_DEPLOYMENT].replica_states)


async def _awaited(response):
    """A DeploymentResponse as a coroutine, for asyncio.wait_for."""
    return await response


def model_deployment(options: ServeOptions):
    """DiffshipModel with the replicas, batching and queue bounds of `options`."""
    settings = dict(
        name=MODEL_DEPLOYMENT,
        # A replica holds one running batch and gathers the next meanwhile; beyond that requests wait in Ray
        # Serve's queue, bounded by max_queued_requests.
        max_ongoing_requests=2 * options.max_batch_size,
        max_queued_requests=options.max_queued_requests,
        ray_actor_options={"num_cpus": options.cpus_per_replica},
        # Shutting down (or scaling down) waits for the requests a replica holds, up to their timeout.
        graceful_shutdown_timeout_s=options.request_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
    )
    if options.autoscale is not None:
        low, high = options.autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "initial_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": options.max_batch_size}
    else:
        settings["num_replicas"] = options.num_replicas
    return DiffshipModel.options(**settings)


@serve.deployment(name=MODEL_DEPLOYMENT)
class DiffshipModel:
    """One replica: the pipeline loaded once; `generate` gathers concurrent requests into batches."""

    def __init__(self, options: dict):
        options = ServeOptions(**options)
        self.model = ServedModel(options.model_dir, options.backend, options.threads)
        self.generate.set_max_batch_size(options.max_batch_size)
        self.generate.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        # The pipeline runs off the event loop (so the next batch gathers meanwhile), one batch at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffship-pipeline")

    def describe(self) -> dict:
        return self.model.describe()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # set from the options in __init__
    async def generate(self, requests: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.model.run, requests)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class DiffshipIngress:
    """HTTP routes: checks, the model call (timeout, retry on a dead replica, 503 past the queue), metrics."""

    def __init__(self, model, options: dict):
        # The options are the ingress's arguments so that a new model or setting (a config file's update) starts a
        # new ingress too: its cached model description is the current model's.
        self.model = model
        self.request_timeout_s = ServeOptions(**options).request_timeout_s
        self.metrics = ServerMetrics()
        self._description = None
        self._describing = asyncio.Lock()

    async def describe(self) -> dict:
        """The model's description, asked of a replica once (every replica loads the same model)."""
        async with self._describing:
            if self._description is None:
                self._description = await self.model.describe.remote()
        return self._description

    @api.get("/health")
    async def health(self):
        """Live: the ingress answers (the model may still be loading; see /ready)."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        """Ready: a model replica answers, with the model loaded."""
        try:
            description = await asyncio.wait_for(self.model.describe.remote(), READY_TIMEOUT_S)
        except Exception as e:  # no replica up, or it failed: not ready, whatever the cause
            return JSONResponse({"ready": False, "reason": f"{type(e).__name__}: {e}"}, status_code=503)
        self._description = self._description or description
        return {"ready": True, "pipeline": description["pipeline"], "backend": description["backend"],
                "tasks": sorted(description["tasks"]), "model_replicas": await asyncio.to_thread(_model_replicas)}

    @api.get("/metrics")
    async def metrics(self):
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    @api.post("/generate")
    async def generate(self, request: Request):
        return await self._serve("/generate", parse_generate, request)

    @api.post("/v1/images/generations")
    async def openai_generations(self, request: Request):
        return await self._serve("/v1/images/generations", parse_openai, request)

    async def _serve(self, route: str, parse, request: Request):
        start = time.perf_counter()
        try:
            generation = await self._parse(parse, request)
            result = await self._run(generation, start)
            response = self._response(route, generation, result)
            self.metrics.answered(route, 200, time.perf_counter() - start)
            return response
        except _Answer as answer:
            self.metrics.answered(route, answer.status, time.perf_counter() - start, answer.kind)
            return answer.response()

    async def _parse(self, parse, request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Answer(400, "the request body must be JSON", "invalid_request_error", "body") from None
        try:
            model = await self.describe()
        except Exception as e:  # no model replica answers yet
            raise _Answer(503, f"the model is not ready: {type(e).__name__}: {e}", "not_ready",
                          headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            return parse(body, model, request.headers.get("x-request-id"))
        except RequestError as e:
            raise _Answer(400, str(e), "invalid_request_error", e.field) from None

    async def _run(self, generation, start: float):
        """The model replica's result, or an _Answer: 503 past the queue or when replicas keep dying, 504 past the
        request's timeout."""
        self.metrics.queue_length.inc()
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                remaining = self.request_timeout_s - (time.perf_counter() - start)
                response = self.model.generate.remote(generation)
                try:
                    result = await asyncio.wait_for(_awaited(response), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    response.cancel()
                    raise _Answer(504, f"request {generation.request_id} timed out after "
                                       f"{self.request_timeout_s:g} s", "timeout") from None
                except BackPressureError:
                    raise _Answer(503, "the server is at capacity (its queue is full); retry later", "overloaded",
                                  headers={"Retry-After": str(RETRY_AFTER_S)}) from None
                except (RayActorError, ReplicaUnavailableError) as e:
                    logger.warning("request %s: model replica lost on attempt %d: %s", generation.request_id,
                                   attempt, type(e).__name__)
                    if attempt < MAX_ATTEMPTS:
                        self.metrics.retries.inc()
                        continue
                    raise _Answer(503, f"the model replica running request {generation.request_id} died "
                                       f"({MAX_ATTEMPTS} attempts); retry later", "replica_died",
                                  headers={"Retry-After": str(RETRY_AFTER_S)}) from None
                except DeploymentUnavailableError as e:
                    raise _Answer(503, str(e), "unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
                if result.error is not None:
                    kind = "invalid_request_error" if result.error_status == 400 else "generation_failed"
                    raise _Answer(result.error_status, result.error, kind)
                return result
        finally:
            self.metrics.queue_length.dec()

    def _response(self, route: str, generation, result):
        import base64

        self.metrics.generated(len(result.pngs), result.batch_size, result.timings)
        headers = {"X-Request-Id": generation.request_id, "X-Batch-Size": str(result.batch_size),
                   "X-Seed": ",".join(str(s) for s in result.seeds),
                   # The standard header for a server's stage timings (browsers' devtools show it), in ms.
                   "Server-Timing": ", ".join(f"{stage};dur={seconds * 1e3:.1f}"
                                              for stage, seconds in result.timings.items()
                                              if isinstance(seconds, float))}
        images = [base64.b64encode(png).decode("ascii") for png in result.pngs]
        if route == "/v1/images/generations":
            return JSONResponse({"created": int(time.time()), "data": [{"b64_json": image} for image in images]},
                                headers=headers)
        if generation.response_format != B64_JSON:
            return Response(result.pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"request_id": generation.request_id, "images": images, "seeds": result.seeds,
                             "timings": result.timings, "batch_size": result.batch_size}, headers=headers)


def build(options: ServeOptions):
    """The application for `options` (checked by the caller): the ingress bound to the model deployment."""
    return DiffshipIngress.bind(model_deployment(options).bind(options.as_args()), options.as_args())


def proxy_http_options(options: ServeOptions) -> dict:
    """Ray Serve's HTTP options for `options` (a config file sets its own `http_options:`)."""
    return {"host": options.host, "port": options.port,
            "request_timeout_s": options.request_timeout_s + PROXY_TIMEOUT_MARGIN_S}


def start(options: ServeOptions, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start Ray here (no dashboard, no usage reports; `num_cpus`: Ray's default, every CPU) or join the
    cluster at `options.address`, then run the application; returns once it is ready. A replica that fails to
    start is a DiffshipError (Ray logs its traceback). `log_to_driver`: the replicas' logs printed here too."""
    import os

    import ray

    from diffship.serving.options import APP_NAME

    if not ray.is_initialized():
        if options.address is None:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # HTTP listens on options.host (127.0.0.1 by default). Ray's own services register the machine's address
            # (Ray maps 127.0.0.1 to it on Linux) and take connections with Ray's token authentication.
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=log_to_driver)
        else:
            ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    serve.start(http_options=proxy_http_options(options))
    try:
        serve.run(build(options), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:
        raise DiffshipError(f"the application did not start: {str(e).splitlines()[0]} (the replicas' errors are "
                            "logged above)") from None


def stop(shutdown_ray: bool) -> None:
    """Delete the application (its replicas drain the requests they hold first); with `shutdown_ray`, also stop
    Serve and the Ray started by start()."""
    import ray

    from diffship.serving.options import APP_NAME

    serve.delete(APP_NAME)
    if shutdown_ray:
        serve.shutdown()
        ray.shutdown()


def run_until_stopped(options: ServeOptions, log=print) -> None:
    """`diffship serve`: start(), then wait for Ctrl-C or SIGTERM and stop() (the requests in flight drain)."""
    import signal
    import threading

    stop_requested = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop_requested.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    local = options.address is None
    try:
        start(options)
        log(f"serving {options.model_dir} at http://{options.host}:{options.port} (POST /generate, "
            "POST /v1/images/generations, GET /health /ready /metrics); Ctrl-C stops")
        stop_requested.wait()
        log("stopping: draining the requests in flight")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        import ray

        if ray.is_initialized():
            stop(shutdown_ray=local)
