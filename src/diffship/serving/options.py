"""How an application is served: replicas, batching, queue bounds, timeouts, where it listens. One record that the
command line (`diffship serve`) and the application builder (`serve run` / `serve deploy` config files) fill and
check alike, before Ray is started or a model is loaded. No Ray here: errors come before Ray is imported."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from diffship.checks import check_int, check_number
from diffship.errors import DiffshipError

# Defaults, each with the reason.
# Batching: a batch of 4 at most, gathered for up to 20 ms. On the CPU the UNet's cost grows about linearly with the
# batch, so batching buys little there (benchmarks/results/serve_load.md); the wait is short against a generation.
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_MS = 20.0
# Requests waiting for a model replica beyond those it runs: past this the server answers 503 with Retry-After.
DEFAULT_MAX_QUEUED_REQUESTS = 64
# A request is answered within this many seconds (504 past it), from when the server accepted it.
DEFAULT_REQUEST_TIMEOUT_S = 300.0
# What a 503 tells clients to wait before retrying (seconds; a generation's order of magnitude on a CPU).
RETRY_AFTER_S = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# The images one request may ask for (`n`, `num_images_per_prompt`): OpenAI's images API allows 1 to 10.
MAX_IMAGES_PER_REQUEST = 10
# Ray Serve's names: the application and its two deployments (a config file's `deployments:` override these).
APP_NAME = "diffship"
INGRESS_DEPLOYMENT = "DiffshipIngress"
MODEL_DEPLOYMENT = "DiffshipModel"
SERVE_INSTALL_HINT = 'pip install "diffship[serve]"'


@dataclass
class ServeOptions:
    """What `diffship serve` and the application builder take (argument names as the builder's `args`)."""

    model_dir: str
    backend: str | None = None
    replicas: int | None = None  # fixed replica count; None: 1, or autoscaling when autoscale is given
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # 1: batching off
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    threads: int | None = None  # per replica: the graphs' threads and the Ray CPUs it reserves; None: backend's
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    address: str | None = None  # an existing Ray cluster; None: Ray started in this process

    @property
    def num_replicas(self) -> int:
        return self.replicas if self.replicas is not None else 1

    @property
    def cpus_per_replica(self) -> int:
        """Ray CPUs a model replica reserves: its threads, or 1 where the backend picks its own threads."""
        return self.threads or 1

    def as_args(self) -> dict:
        return asdict(self)


def parse_autoscale(value: str, name: str = "--autoscale") -> tuple[int, int]:
    """"MIN:MAX" -> (MIN, MAX), 1 <= MIN <= MAX."""
    parts = str(value).split(":")
    try:
        low, high = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise ValueError(f"{name} must be MIN:MAX replicas with 1 <= MIN <= MAX (e.g. 1:4), got {value!r}")
    return low, high


def check_options(options: ServeOptions, name=lambda argument: argument, local_cpus: int | None = None) -> None:
    """Every option, named by `name(argument)` in errors (the CLI's flags, the builder's args). `local_cpus`: the
    CPUs of a Ray started here, which every replica's reservation must fit in (a cluster may add nodes)."""
    if not str(options.model_dir or "").strip():
        raise ValueError(f"{name('model_dir')} is required: an exported pipeline directory or hub repo id")
    if options.replicas is not None and options.autoscale is not None:
        raise ValueError(f"give {name('replicas')} or {name('autoscale')}, not both")
    if options.replicas is not None:
        check_int(options.replicas, name("replicas"), 1)
    if options.autoscale is not None:
        low, high = options.autoscale
        check_int(low, name("autoscale") + " MIN", 1)
        check_int(high, name("autoscale") + " MAX", low)
    check_int(options.max_batch_size, name("max_batch_size"), 1)
    check_number(options.batch_wait_ms, name("batch_wait_ms"), 0.0)
    if options.threads is not None:
        check_int(options.threads, name("threads"), 1)
    check_int(options.max_queued_requests, name("max_queued_requests"), 1)
    check_number(options.request_timeout_s, name("request_timeout_s"), 0.001)
    if not str(options.host or "").strip():
        raise ValueError(f"{name('host')} must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    check_int(options.port, name("port"), 1, 65535)
    if local_cpus is not None:
        replicas = options.autoscale[1] if options.autoscale else options.num_replicas
        needed = replicas * options.cpus_per_replica
        if needed > local_cpus:
            which = name("autoscale") if options.autoscale else name("replicas")
            raise ValueError(f"{which}: {replicas} replica(s) x {options.cpus_per_replica} CPU(s) "
                             f"({name('threads')}) need {needed} CPUs; this machine has {local_cpus} (give fewer, or "
                             f"{name('address')} of a Ray cluster)")


def options_from_args(args: dict) -> ServeOptions:
    """A ServeOptions from an application builder's `args` (a config file's `args:`, or `serve run ... key=value`,
    where every value is a string), checked; unknown keys are refused by name."""
    known = {f.name: f for f in fields(ServeOptions)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise DiffshipError(f"unknown argument(s) {', '.join(unknown)}; diffship's application takes "
                            f"{', '.join(known)}")
    values = {}
    for key, value in args.items():
        if isinstance(value, str) and key not in ("model_dir", "backend", "host", "address"):
            value = _from_string(key, value)
        values[key] = value
    if isinstance(values.get("autoscale"), list):  # YAML [1, 4]
        values["autoscale"] = tuple(values["autoscale"])
    options = ServeOptions(**values)
    check_options(options)
    return options


def _from_string(key: str, value: str):
    """`serve run module:app key=value` passes strings: numbers and MIN:MAX back to their types."""
    if key == "autoscale":
        return parse_autoscale(value, "autoscale")
    try:
        return float(value) if key in ("batch_wait_ms", "request_timeout_s") else int(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def local_cpus() -> int:
    """The CPUs a Ray started here gets (Ray's own default: every CPU this process may run on)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_model_dir(model_dir: str, backend: str | None, name=lambda argument: argument,
                    must_exist: bool = True) -> str | None:
    """A local directory holds graphs the backend runs (the backend it gets, as from_pretrained chooses); a hub
    repo id is left to the replicas to fetch (None: its file listing chooses). `must_exist=False`: a path that is
    not here (a cluster's replicas may see volumes this node does not) is left to the replicas too."""
    from diffship.hub import check_hub_id, is_local
    from diffship.runtimes import backend_name, choose_backend, graph_folders

    if backend is not None:
        try:
            backend = backend_name(backend)
        except DiffshipError as e:
            raise DiffshipError(f"{name('backend')}: {e}") from None
    if not is_local(model_dir):
        if not must_exist:
            return backend
        try:
            check_hub_id(model_dir)
        except DiffshipError as e:
            raise DiffshipError(f"{name('model_dir')} {e}") from None
        return backend
    path = Path(model_dir).expanduser()
    folders = graph_folders(path)
    if not path.is_dir() or not folders:
        raise DiffshipError(f"{name('model_dir')} {model_dir} holds no exported pipeline (no component folder with a "
                            "graph); export one with `diffship export`")
    return choose_backend(folders, backend)
