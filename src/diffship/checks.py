"""Checks of what a user gives diffship: argument values, output paths and the JSON files it reads at run time.

The command line (naming its flags), the pipelines and the benchmarks (naming their arguments) share these, so
that one rule has one wording. An argument value that is out of range raises ValueError; a malformed file raises
DiffshipError naming the file. Each message says what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import json
import math
import os
from numbers import Integral, Real
from pathlib import Path

from diffship.errors import DiffshipError, MissingComponentError

# Image sides are multiples of 8 (diffusers' rule for Stable Diffusion, whose VAE scales by 8; a VAE with a larger
# factor asks for multiples of its own) up to MAX_IMAGE_SIDE. The bound catches typos before a model is loaded, not
# sizes that fit in memory: no Stable Diffusion model is trained past about 1024 px a side (SD 1.x 512, SD 2 768,
# SDXL's buckets near 1024) and diffusers' upscalers stop at 2048, while past 4096 the VAE decoder's mid-block
# attention alone ((H/8 * W/8)^2 floats) needs hundreds of GB; a 100000 px side would fail with a MemoryError.
IMAGE_SIZE_MULTIPLE = 8
MAX_IMAGE_SIDE = 4096
# Seeds: numpy's Generator takes any non-negative int, torch.manual_seed (the tiny models' weights) up to 2**64 - 1.
MAX_SEED = 2**64 - 1
# Extensions PIL writes, named in errors; `image_format` asks PIL itself.
COMMON_IMAGE_EXTENSIONS = ".png, .jpg, .webp, .bmp or .tiff"


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value, name: str, low: int, high: int | None = None) -> None:
    """An integer (not a bool) from `low` to `high` (inclusive; no upper bound when None)."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        accepted = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{name} must be an integer {accepted}, got {value!r}")


def check_number(value, name: str, low: float | None = None, high: float | None = None) -> None:
    """A finite real number (not a bool), within [low, high] where given."""
    if not _is_number(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            accepted = f"between {low} and {high}"
        elif low is not None:
            accepted = f"a finite number of at least {low}"
        elif high is not None:
            accepted = f"a finite number of at most {high}"
        else:
            accepted = "a finite number"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_image_size(sizes: dict, multiple: int = IMAGE_SIZE_MULTIPLE) -> None:
    """Each value of `sizes` (argument name -> pixels; None: the default, not checked) a multiple of `multiple`
    from `multiple` to MAX_IMAGE_SIDE."""
    bad = {name: value for name, value in sizes.items()
           if value is not None and not (_is_int(value) and multiple <= value <= MAX_IMAGE_SIDE
                                         and value % multiple == 0)}
    if bad:
        raise ValueError(
            f"{' and '.join(bad)} must be {'a multiple' if len(bad) == 1 else 'multiples'} of {multiple} from "
            f"{multiple} to {MAX_IMAGE_SIDE} pixels, got {' and '.join(repr(v) for v in bad.values())}"
        )


def check_scheduler_name(value: str, name: str = "scheduler", kind: str | None = None, user: str = "this model") -> None:
    """A scheduler name diffship runs: a short name (euler-a, dpm++2m-karras, ...) or a diffusers class name; with
    `kind` (schedulers.NOISE / FLOW, what `user`'s denoiser predicts), one of that kind."""
    from diffship.schedulers import check_scheduler_kind, scheduler_by_name

    try:
        scheduler = scheduler_by_name(value)  # built from the defaults: cheap, and the names' one source of truth
        if kind is not None:
            check_scheduler_kind(scheduler, kind, user)
    except DiffshipError as e:
        raise DiffshipError(f"{name}: {e}") from None


def image_format(path: Path) -> str | None:
    """The format PIL writes for `path`'s extension, or None when PIL cannot write an RGB image in it."""
    from PIL import Image

    Image.init()  # registers every plugin, so that the extension table is complete
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in Image.SAVE:
        return None
    try:  # some writers take only other modes (XBM: 1-bit); a pixel in memory says
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # PIL's writers refuse with OSError, ValueError or KeyError, depending on the plugin
        return None
    return fmt


def check_output_file(path, name: str, image: bool = False, overwrite: bool = False) -> None:
    """`path` can be written as a file: not a directory, in a directory that exists (or can be made) and is
    writable, and, for an image, with an extension PIL writes; an existing file only if diffship wrote it (or
    `overwrite`). Checked before the work that produces the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a directory; give a file path")
    if image and image_format(path) is None:
        kind = f"{path.suffix} files" if path.suffix else "a file without an extension"
        raise ValueError(f"{name} {path}: PIL cannot write {kind}; use {COMMON_IMAGE_EXTENSIONS}")
    if (path.exists() or path.is_symlink()) and not overwrite and not written_by_diffship(path):
        raise ValueError(f"{name} {path} exists and diffship did not write it; pass --overwrite to replace it, or "
                         "give another path")
    check_writable(path, name)


# The EXIF Software tag of the images diffship saves (PNG, JPEG, WebP and TIFF carry EXIF), and the "schema" prefix
# of the JSON it writes: how a later run knows that a file it would replace is its own.
SOFTWARE = "diffship"
_EXIF_SOFTWARE = 0x0131


def software_exif():
    """EXIF naming diffship as the software, for image.save(..., exif=...)."""
    from PIL import Image

    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = SOFTWARE
    return exif


def written_by_diffship(path: Path) -> bool:
    """An image whose EXIF (or PNG text) names diffship as its software, or a JSON object whose "schema" is
    diffship's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # EXIF, or a PNG text chunk (matplotlib's plots)
            software = image.getexif().get(_EXIF_SOFTWARE) or image.info.get("Software", "")
            return str(software).startswith(SOFTWARE)
    except (OSError, UnidentifiedImageError, ValueError):
        pass
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith(SOFTWARE)


def check_output_dir(path, name: str) -> None:
    """`path` can be written as a new directory: not a file, not a folder with anything in it (its files would be
    overwritten), and it or the first of its parents that exists writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{name} {path} exists and is not empty; give a new folder")
    check_writable(path, name)


def check_writable(path: Path, name: str) -> None:
    """`path`, or the nearest parent that exists (where the missing ones will be made), is a writable directory."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if existing != path.absolute() and not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is a file, so no directory can be made there")
    # A new entry in a directory needs write and search permission there; an existing file, write permission.
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise ValueError(f"{name} {path}: {existing} is not writable")


# ---- JSON files: one reader, so that every malformed file is named ------------------------------------------------

# JSON type names for the Python types a field spec uses (float: any number but NaN, as diffusers saves some
# defaults as -Infinity; None: null).
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object", None: "null"}


def _json_kind(value) -> str:
    return "null" if value is None else {bool: "boolean", int: "number", float: "number", str: "string",
                                         list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _matches(value, kind) -> bool:
    if kind is None:
        return value is None
    if kind is float:
        return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    if kind is int:
        return _is_int(value)
    return isinstance(value, kind)


def check_fields(data: dict, fields: dict, where) -> None:
    """Each key of `fields` present in `data` holds a value of its type(s): int, float (a finite number), bool, str,
    list, dict or None (null). `where` (the file) is named in the error."""
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key in data and not any(_matches(data[key], k) for k in kinds):
            raise DiffshipError(
                f"{where}: {key} must be {' or '.join(_KINDS[k] for k in kinds)}, found {_json_kind(data[key])} "
                f"{json.dumps(data[key])[:80]}; fix or re-export the file"
            )


def read_json_object(path, fields: dict | None = None) -> dict:
    """The JSON object in `path`, its `fields` type-checked (see check_fields). A DiffshipError names the file when
    it is missing, not UTF-8 JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise MissingComponentError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DiffshipError(f"{path} is not a JSON text file (not UTF-8: {e})") from e
    except json.JSONDecodeError as e:
        raise DiffshipError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DiffshipError(f"{path} must hold a JSON object ({{...}}), found a {_json_kind(data)}")
    check_fields(data, fields or {}, path)
    return data
