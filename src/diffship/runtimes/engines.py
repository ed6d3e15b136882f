"""TensorRT engines: the optimization profile a component's engine is built for, the build itself (from the
component's validated model.onnx), and the engine cache.

**Profiles.** An engine runs the input shapes its optimization profile covers (min, opt, max per input), so the
profile is computed from what the pipelines feed each component (docs/architecture.md, "Contracts"), for a
`ShapeRange` of requests: images per call, image height and width, each as (min, opt, max), and whether
classifier-free guidance doubles the UNet's batch. Per component and input: axis 0 is the batch (the UNet's,
doubled under guidance unless it is an LCM UNet, which runs no unconditional batch; a dynamic range then reaches
down to the unguided batch so that guidance_scale <= 1 runs too); a rank-4 input of the UNet, its DeepCache
shallow graph and the VAE decoder is a latent (image size / the VAE's scale factor), of the VAE encoder an image;
axis 1 of the other inputs is the tokenizer's sequence length (77: prompts are padded to it); axes the graph fixes
keep their size. SDXL's text_embeds and time_ids and LCM's timestep_cond are batch-only inputs.

**Why the build is here, in runtimes/, and not only in the exporter.** An engine is specific to the GPU model and
the TensorRT version it was built with. An export made on one machine must still run on another, so loading
rebuilds what does not fit, from the ONNX graph the export validated: that needs TensorRT's builder at run time
(no torch), like OpenVINO's compile at load. `exporters/tensorrt.py` builds the same engines at export time and
writes them beside the ONNX.

**The engine cache.** An engine is keyed by the GPU's name and compute capability, the TensorRT version, the
ONNX graph's content hash (model.onnx and its external data), the profile request and the build options. A load
uses the export's engine (`model.plan`, its key in `model.plan.json`) when its key is the one wanted, else the
cache's (`~/.cache/diffship/tensorrt/<key>/`), else builds into the cache, saying why the export's engine did not
fit (another GPU, another TensorRT version, another profile). The content hash of a multi-GB graph is remembered
by file size and modification time, so a second load builds and hashes nothing. A cache entry notes the graph file
it was built from; building for a re-exported graph removes the entries of its earlier version (same device,
request and options), so the cache does not grow by an engine at each re-export.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffship.errors import BackendError, DiffshipError, GPUUnavailableError
from diffship.layout import (
    CONFIG,
    TENSORRT_ENGINE,
    TENSORRT_ENGINE_INFO,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    vae_scale_factor,
)
from diffship.runtimes.cache import cache_root, remove_entry

logger = logging.getLogger(__name__)

INSTALL_TENSORRT = "pip install 'diffship[tensorrt]'"
# Components whose rank-4 inputs are latents, or images.
LATENT_COMPONENTS = (UNET, UNET_SHALLOW, VAE_DECODER)
IMAGE_COMPONENTS = (VAE_ENCODER,)
# Components that see classifier-free guidance's doubled batch.
GUIDED_COMPONENTS = (UNET, UNET_SHALLOW)
SEQUENCE_LENGTH = 77
# Dynamic profiles by default: up to this many images per call, image sides from half to twice the export's
# (TensorRT's diffusion demo builds SD 1.5 for 256 to 1024).
DEFAULT_MAX_BATCH = 4
MAX_SIDE = 2048

Range = tuple[int, int, int]


def _range(value, name: str) -> Range:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        low, opt, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DiffshipError(f"{name} must be an integer or (min, opt, max), got {value!r}") from None
    if not 1 <= low <= opt <= high:
        raise DiffshipError(f"{name} must satisfy 1 <= min <= opt <= max, got {(low, opt, high)}")
    return low, opt, high


@dataclass(frozen=True)
class ShapeRange:
    """The requests an engine serves: images per call (`batch`), image `height` and `width` in pixels, each
    (min, opt, max); `guidance`: classifier-free guidance doubles the UNet's batch. TensorRT tunes its kernels for
    `opt` and runs anything from min to max."""

    batch: Range
    height: Range
    width: Range
    guidance: bool = True
    sequence_length: int = SEQUENCE_LENGTH

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            object.__setattr__(self, name, _range(getattr(self, name), name))
        for name in ("height", "width"):
            if any(v % 8 for v in getattr(self, name)):
                raise DiffshipError(f"{name} {getattr(self, name)}: image sides are multiples of 8")

    @classmethod
    def static(cls, batch: int, height: int, width: int, guidance: bool = True) -> "ShapeRange":
        """Exactly one request: TensorRT's fastest engines, and CUDA graphs can replay them."""
        return cls(batch, height, width, guidance)

    @classmethod
    def dynamic(cls, batch: int, height: int, width: int, guidance: bool = True,
                max_batch: int | None = None) -> "ShapeRange":
        """Tuned for (batch, height, width), running 1 to max_batch images (default max(batch, 4)) and sides
        from half to twice the given ones (multiples of 8, within 8 to 2048)."""
        def side(v: int) -> Range:
            return max(8, v // 2 // 8 * 8), v, min(MAX_SIDE, max(v, 2 * v))

        return cls((1, batch, max(batch, max_batch or DEFAULT_MAX_BATCH)), side(height), side(width), guidance)

    @property
    def is_static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width))

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width),
                "guidance": self.guidance, "sequence_length": self.sequence_length}

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeRange":
        return cls(tuple(data["batch"]), tuple(data["height"]), tuple(data["width"]), bool(data["guidance"]),
                   int(data.get("sequence_length", SEQUENCE_LENGTH)))


@dataclass(frozen=True)
class ComponentContext:
    """What a component's profile depends on besides its inputs: its role (the folder's name), whether it sees
    guidance's doubled batch (not an LCM UNet), and the VAE's scale factor."""

    role: str
    guided: bool = True
    vae_scale_factor: int = 8

    @classmethod
    def of_folder(cls, folder: Path) -> "ComponentContext":
        """Read from an exported directory: the folder's name, its config.json (an LCM UNet has
        time_cond_proj_dim) and the VAE's config beside it."""
        folder = Path(folder)
        config = _read_json(folder / CONFIG)
        vae = _read_json(folder.parent / VAE_DECODER / CONFIG) or _read_json(folder.parent / VAE_ENCODER / CONFIG)
        scale = vae_scale_factor(vae.get("block_out_channels", [0] * 4)) if vae else 8
        return cls(folder.name, config.get("time_cond_proj_dim") is None, scale)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dynamic(d) -> bool:
    return d is None or isinstance(d, str) or (isinstance(d, int) and d < 0)


def _latent_range(side: Range, scale: int) -> Range:
    """Image sides (min, opt, max) -> latent sides: min rounds up and max down, so that every latent the engine
    runs comes from an image side the range allows."""
    low = -(-side[0] // scale)
    high = max(low, side[2] // scale)
    return low, min(high, max(low, side[1] // scale)), high


def component_profile(context: ComponentContext, inputs, shapes: ShapeRange) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min, opt, max) shapes} of one component's engine for `shapes`. `inputs`: (name, shape) pairs as
    the graph declares them, a dynamic axis as None, a name or -1. Inputs of rank 0 (the timestep) are left out:
    they have nothing to choose."""
    role = context.role
    batch = shapes.batch
    if role in GUIDED_COMPONENTS and shapes.guidance and context.guided:
        # Under guidance the UNet sees twice the images; a dynamic engine also runs guidance off (one batch).
        batch = ((batch[0] if not shapes.is_static else 2 * batch[0]), 2 * batch[1], 2 * batch[2])
    if role in LATENT_COMPONENTS:
        spatial = tuple(_latent_range(r, context.vae_scale_factor) for r in (shapes.height, shapes.width))
    elif role in IMAGE_COMPONENTS:
        spatial = (shapes.height, shapes.width)
    else:
        spatial = None
    profile = {}
    for name, shape in inputs:
        shape = tuple(shape)
        if not shape:
            continue
        ranges = []
        for axis, d in enumerate(shape):
            if not _dynamic(d):
                ranges.append((int(d),) * 3)
            elif axis == 0:
                ranges.append(batch)
            elif len(shape) == 4 and axis in (2, 3) and spatial is not None:
                ranges.append(spatial[axis - 2])
            elif axis == 1 and len(shape) in (2, 3):
                ranges.append((shapes.sequence_length,) * 3)
            else:
                raise DiffshipError(f"{role}: no rule gives a TensorRT profile for axis {axis} of input {name} "
                                    f"{list(shape)}; export it with static shapes (--static)")
        profile[name] = tuple(tuple(r[i] for r in ranges) for i in range(3))
    return profile


def opt_shapes(profile: dict) -> dict[str, tuple[int, ...]]:
    """The shapes an engine is tuned for: each input's opt."""
    return {name: tuple(shapes[1]) for name, shapes in profile.items()}


# ---- build options ------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "strongly_typed")


@dataclass(frozen=True)
class BuildOptions:
    """How an engine is built. `precision`: "fp32" (TF32 off: as PyTorch computes fp32, the parity path), "tf32"
    (TensorRT's own default for fp32 graphs on Ampere and later), "fp16" / "bf16" (TensorRT 10 may choose those
    kernels for an fp32 graph, layer by layer), or "strongly_typed" (every tensor in the type the ONNX graph says:
    an fp16 export runs fp16, its fp32 VAE fp32; TensorRT 11 builds only this way, as it dropped the fp16/bf16
    builder flags). `optimization_level`: TensorRT's builder optimization level, 0 to 5."""

    precision: str = "fp32"
    optimization_level: int = 3

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise DiffshipError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.optimization_level, int) or not 0 <= self.optimization_level <= 5:
            raise DiffshipError(f"TensorRT optimization level must be 0 to 5, got {self.optimization_level!r}")

    def check_version(self, tensorrt_version: str) -> None:
        """TensorRT 11 builds strongly typed networks only."""
        if self.precision in ("fp16", "bf16") and int(tensorrt_version.split(".")[0]) >= 11:
            raise DiffshipError(f"TensorRT {tensorrt_version} has no {self.precision} builder flag (networks are "
                                "strongly typed): export with --dtype fp16 and build with precision "
                                "'strongly_typed', which runs the graph's own types")

    def to_dict(self) -> dict:
        return asdict(self)


def default_precision(onnx_dtypes) -> str:
    """strongly_typed for a graph that holds fp16 or bf16 tensors (an fp16 export: its types are the engine's), fp32
    otherwise."""
    return "strongly_typed" if any(str(t) in ("float16", "bfloat16") for t in onnx_dtypes) else "fp32"


# ---- keys ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two keys with the same digest name interchangeable engines."""

    gpu: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    onnx_sha256: str
    role: str
    shapes: dict = field(hash=False)
    options: dict = field(hash=False)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "compute_capability": list(self.compute_capability),
                "tensorrt_version": self.tensorrt_version, "onnx_sha256": self.onnx_sha256, "role": self.role,
                "shapes": self.shapes, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict) -> "EngineKey":
        return cls(data["gpu"], tuple(data["compute_capability"]), data["tensorrt_version"], data["onnx_sha256"],
                   data["role"], data["shapes"], data["options"])

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def engine_key(device, onnx_sha256: str, context: ComponentContext, shapes: ShapeRange,
               options: BuildOptions) -> EngineKey:
    """The key of the engine for this device (a cuda.DeviceInfo: GPU name, compute capability, TensorRT
    version), graph, component, request and options."""
    return EngineKey(device.name, tuple(device.compute_capability), device.tensorrt_version, onnx_sha256,
                     context.role, {**shapes.to_dict(), "guided": context.guided,
                                    "vae_scale_factor": context.vae_scale_factor}, options.to_dict())


def key_difference(built: EngineKey, wanted: EngineKey) -> str:
    """Why an engine built for `built` does not serve `wanted`, in words (the first reasons that apply)."""
    reasons = []
    if built.gpu != wanted.gpu or built.compute_capability != wanted.compute_capability:
        reasons.append(f"it was built for {built.gpu} (compute capability {'.'.join(map(str, built.compute_capability))}), "
                       f"this is {wanted.gpu} ({'.'.join(map(str, wanted.compute_capability))})")
    if built.tensorrt_version != wanted.tensorrt_version:
        reasons.append(f"it was built with TensorRT {built.tensorrt_version}, this is TensorRT {wanted.tensorrt_version}")
    if built.onnx_sha256 != wanted.onnx_sha256:
        reasons.append("the ONNX graph changed since it was built")
    if built.shapes != wanted.shapes:
        reasons.append(f"it was built for {_describe_shapes(built.shapes)}, {_describe_shapes(wanted.shapes)} "
                       "was asked")
    if built.options != wanted.options:
        reasons.append(f"it was built with {built.options}, {wanted.options} was asked")
    if built.role != wanted.role:
        reasons.append(f"it was built as the {built.role}, not the {wanted.role}")
    return "; ".join(reasons) or "its key differs"


def _describe_shapes(shapes: dict) -> str:
    def r(values):
        return str(values[0]) if values[0] == values[2] else f"{values[0]}-{values[2]}"

    return (f"{r(shapes['batch'])} images of {r(shapes['height'])}x{r(shapes['width'])}"
            + (" with guidance" if shapes.get("guidance") else ""))


def onnx_files(onnx_path: Path) -> list[Path]:
    """model.onnx and its external data files (as runtimes/cache.py finds them)."""
    onnx_path = Path(onnx_path)
    return [onnx_path] + sorted(p for p in onnx_path.parent.iterdir()
                                if p.is_file() and p.name.startswith(onnx_path.name + "_data"))


HASH_MEMO = "onnx-hashes.json"


def onnx_sha256(onnx_path: Path, memo_dir: Path | None = None) -> str:
    """The content hash of an ONNX graph and its external data. Hashing a full-size UNet's 3.4 GB takes seconds, so
    the digest is remembered in `memo_dir` by path, size and modification time of each file (a re-export changes
    them; then the content is hashed again)."""
    files = onnx_files(onnx_path)
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo_path = Path(memo_dir) / HASH_MEMO if memo_dir is not None else None
    memo = _read_json(memo_path) if memo_path is not None else {}
    if stamp in memo:
        return memo[stamp]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    value = digest.hexdigest()
    if memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            resolved = str(Path(onnx_path).resolve())
            memo = {k: v for k, v in memo.items() if not k.startswith(resolved + ":")}  # the graph's older versions
            memo[stamp] = value
            _write_atomic(memo_path, json.dumps(memo, indent=1).encode())
        except OSError:  # a read-only cache: hash again next time
            pass
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, path)


# ---- finding an engine --------------------------------------------------------------------------------------------


@dataclass
class EngineFile:
    """An engine on disk and its key: `source` says where it came from ("export", "cache", "built")."""

    path: Path
    key: EngineKey
    source: str
    build_seconds: float | None = None


def read_info(info_path: Path) -> dict | None:
    """An engine's info file (its key and profile), or None when absent or unreadable."""
    data = _read_json(info_path)
    return data if "key" in data else None


def exported_engine(folder: Path) -> tuple[Path, dict] | None:
    """(model.plan, its info) an export wrote into a component folder, if any."""
    folder = Path(folder)
    info = read_info(folder / TENSORRT_ENGINE_INFO)
    if info is None or not (folder / TENSORRT_ENGINE).is_file():
        return None
    return folder / TENSORRT_ENGINE, info


def find_engine(folder: Path, wanted: EngineKey, cache_dir=None) -> tuple[EngineFile | None, str | None]:
    """The engine for `wanted`: the export's (in `folder`) if its key is the one wanted, else the cache's. Returns
    (engine or None, why the export's engine did not serve, or None)."""
    why = None
    exported = exported_engine(folder)
    if exported is not None:
        path, info = exported
        try:
            built = EngineKey.from_dict(info["key"])
        except (KeyError, TypeError, ValueError):
            built = None
        if built is not None and built.digest == wanted.digest:
            return EngineFile(path, built, "export"), None
        why = key_difference(built, wanted) if built is not None else "its info file is unreadable"
    root = cache_root(cache_dir)
    if root is not None:
        entry = root / "tensorrt" / wanted.digest
        if (entry / TENSORRT_ENGINE).is_file() and read_info(entry / TENSORRT_ENGINE_INFO) is not None:
            return EngineFile(entry / TENSORRT_ENGINE, wanted, "cache"), why
    return None, why


def write_engine(folder: Path, engine: bytes, key: EngineKey, profile: dict, build_seconds: float,
                 source: Path | None = None) -> Path:
    """model.plan and model.plan.json into `folder`, the plan written whole before its info (a reader that finds
    the info finds the whole plan). `source`: the ONNX graph it was built from (cache entries note it)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / TENSORRT_ENGINE, bytes(engine))
    info = {"key": key.to_dict(), "digest": key.digest, **({"source": str(source)} if source else {}),
            "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
            "build_seconds": round(build_seconds, 3),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(folder / TENSORRT_ENGINE_INFO, (json.dumps(info, indent=2) + "\n").encode())
    return folder / TENSORRT_ENGINE


def cache_entry(key: EngineKey, cache_dir=None) -> Path | None:
    root = cache_root(cache_dir)
    return None if root is None else root / "tensorrt" / key.digest


def remove_replaced(entry: Path, key: EngineKey, source: Path) -> None:
    """Remove the cache entries built from an earlier version of the same graph file for the same device, request
    and options (the graph was re-exported since): a full-size UNet's engine is gigabytes."""
    for other in entry.parent.iterdir():
        info = read_info(other / TENSORRT_ENGINE_INFO) if other != entry and other.is_dir() else None
        if info is None or info.get("source") != str(source):
            continue
        old = {**info["key"], "onnx_sha256": key.onnx_sha256}
        if old == key.to_dict() and info["key"].get("onnx_sha256") != key.onnx_sha256:
            remove_entry(other)


# ---- TensorRT ---------------------------------------------------------------------------------------------------


def tensorrt():
    """The tensorrt module, or GPUUnavailableError naming the pip command."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise GPUUnavailableError(f"the tensorrt backend needs NVIDIA TensorRT, which is not installed: "
                                  f"{INSTALL_TENSORRT} (an NVIDIA GPU and driver are needed to run it)") from e
    return trt


def check_tensorrt(device: int = 0):
    """Everything the tensorrt backend needs, checked before any work: TensorRT, CUDA's Python binding, a GPU.
    Returns this device's cuda.DeviceInfo."""
    from diffship.runtimes.cuda import DeviceInfo, device_properties

    trt = tensorrt()
    name, capability = device_properties(device)
    return DeviceInfo(name, capability, trt.__version__)


def _logger(trt):
    """A TensorRT logger that keeps the errors (for the exception a failed build raises) and sends errors and
    warnings to Python's logging; TensorRT's info lines are build chatter."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif int(severity) == int(trt.ILogger.Severity.WARNING):
                logger.debug("TensorRT: %s", msg)

    return Logger()


def timing_cache_path(device, cache_dir=None) -> Path | None:
    """One timing cache per GPU model and TensorRT version, shared by every build on them: a second engine of the
    same layers (another profile, another component with the same blocks) skips their tactic timing."""
    root = cache_root(cache_dir)
    if root is None:
        return None
    name = "".join(c if c.isalnum() else "-" for c in f"{device.name}-sm{''.join(map(str, device.compute_capability))}"
                   f"-trt{device.tensorrt_version}")
    return root / "tensorrt" / "timing" / f"{name}.cache"


def build_engine(onnx_path: Path, context: ComponentContext, shapes: ShapeRange, options: BuildOptions,
                 timing_cache: Path | None = None) -> tuple[bytes, dict, float]:
    """Parse `onnx_path` (with its external data) and build a serialized engine for `shapes`: (engine, the
    profile it was built with, seconds). The timing cache file is read first and written back."""
    trt = tensorrt()
    options.check_version(trt.__version__)
    log = _logger(trt)
    started = time.perf_counter()
    builder = trt.Builder(log)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if options.precision == "strongly_typed" and major < 11:  # TensorRT 11: always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors or 'no reason given'}")
    inputs = [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]
    profile_shapes = component_profile(context, inputs, shapes)
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif options.precision in ("fp16", "bf16"):
        config.set_flag(getattr(trt.BuilderFlag, options.precision.upper()))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path} for {_describe_shapes(shapes.to_dict())}: "
                           + ("; ".join(log.errors[-3:]) or "see the TensorRT log"))
    if cache is not None:
        try:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError:  # a read-only cache: the next build times its tactics again
            pass
    return bytes(serialized), profile_shapes, time.perf_counter() - started


def engine_for(folder: Path, onnx_path: Path, device, context: ComponentContext, shapes: ShapeRange,
               options: BuildOptions, cache_dir=None, target: Path | None = None) -> EngineFile:
    """The engine file for this component, device, request and options: found (export's, then cache's) or built.
    `target`: where a build is written (the export's folder); default the cache (or, with the cache off, a
    temporary folder the caller owns)."""
    root = cache_root(cache_dir)
    wanted = engine_key(device, onnx_sha256(onnx_path, root / "tensorrt" if root else None), context, shapes,
                        options)
    if target is None:
        found, why = find_engine(folder, wanted, cache_dir)
        if found is not None:
            return found
        if why is not None:
            logger.warning("%s: the exported TensorRT engine does not fit: %s. Building one for %s%s (minutes for a "
                           "full-size UNet; a second load reuses it).", Path(folder).name, why, device.describe(),
                           f", cached in {cache_entry(wanted, cache_dir)}" if root is not None else "")
    engine, profile, seconds = build_engine(onnx_path, context, shapes, options, timing_cache_path(device, cache_dir))
    destination = target or cache_entry(wanted, cache_dir)
    if destination is None:  # no cache: a temporary file, read once by the session
        import tempfile

        destination = Path(tempfile.mkdtemp(prefix="diffship-trt-"))
    source = Path(onnx_path).resolve()
    try:
        path = write_engine(destination, engine, wanted, profile, seconds, source if target is None else None)
        if target is None and root is not None:
            remove_replaced(destination, wanted, source)
    except OSError:
        if target is not None:
            raise
        remove_entry(destination)
        import tempfile

        path = write_engine(Path(tempfile.mkdtemp(prefix="diffship-trt-")), engine, wanted, profile, seconds)
    return EngineFile(path, wanted, "built", seconds)
