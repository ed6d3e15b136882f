"""The HTTP API's request bodies, checked field by field into GenerationRequest before any work starts.

Two bodies: `/generate` takes the pipelines' own argument names (diffusers'), and refuses a field it does not know
(a typo such as `num_inference_step` would otherwise be a silent default); `/v1/images/generations` takes OpenAI's
images API (`prompt`, `n`, `size` "WxH", `response_format`) and ignores fields it does not know, as OpenAI clients
expect, while honouring the diffusers names above as extensions (a client's `extra_body`). Every refusal is a
RequestError naming the field; no Ray here.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field

from diffship.checks import MAX_IMAGE_SIDE, MAX_SEED, check_image_size, check_int, check_number
from diffship.errors import DiffshipError
from diffship.serving.options import MAX_IMAGES_PER_REQUEST

TEXT_TO_IMAGE = "text-to-image"
IMAGE_TO_IMAGE = "image-to-image"
INPAINTING = "inpainting"

# Response formats: base64 PNGs in JSON (OpenAI's `b64_json`), or the PNG itself (one image).
B64_JSON = "b64_json"
PNG = "png"
RESPONSE_FORMATS = (B64_JSON, PNG)

# /generate's fields (diffusers' names, plus the server's own: seed, scheduler, response_format, request_id).
GENERATE_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "seed",
                   "scheduler", "strength", "image", "mask_image", "num_images_per_prompt", "response_format",
                   "request_id")
# The diffusers names the OpenAI route also honours (OpenAI's own fields come first: prompt, n, size, ...).
OPENAI_EXTENSIONS = ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler")
OPENAI_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
MAX_REQUEST_ID = 128


class RequestError(DiffshipError):
    """A request the server refuses before any work: `field` is the offending field (OpenAI's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@contextmanager
def _field(name: str):
    """A check's ValueError or DiffshipError becomes a RequestError for field `name`."""
    try:
        yield
    except RequestError:
        raise
    except (ValueError, TypeError, DiffshipError) as e:
        raise RequestError(name, str(e)) from None


@dataclass
class GenerationRequest:
    """One request, every value resolved (defaults filled, seed drawn), as the model replica runs it."""

    request_id: str
    task: str
    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int  # image k of the request is drawn with seed + k: each image is the one-image request of that seed
    scheduler: str | None
    num_images: int = 1
    strength: float | None = None
    image: object = field(default=None, repr=False)  # PIL image
    mask_image: object = field(default=None, repr=False)
    response_format: str = B64_JSON

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_images)]

    def batch_key(self) -> tuple:
        """Requests with equal keys run as one batch through the pipeline: the same task, size, schedule and
        guidance (the UNet's batch shares them), and a negative prompt on all or none (SDXL's None is zeros, not
        the empty prompt's embedding)."""
        return (self.task, self.height, self.width, self.num_inference_steps, self.scheduler, self.guidance_scale,
                self.strength, self.negative_prompt is None)


def _check_keys(body, allowed=None) -> dict:
    if not isinstance(body, dict):
        raise RequestError("body", "the request body must be a JSON object")
    if allowed is not None:
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; /generate takes {', '.join(allowed)}")
    return body


def _string(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(name, f"{name} is required")
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"{name} must be a string, got {type(value).__name__}")
    return value


def decode_image(value, name: str):
    """A base64 string (a data URL's `data:image/...;base64,` prefix allowed) of a picture PIL reads, as an RGB PIL
    image (a mask: grayscale)."""
    from PIL import Image

    if not isinstance(value, str):
        raise RequestError(name, f"{name} must be a base64-encoded image (PNG, JPEG, ...), got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"{name} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            picture = image.convert("L" if name == "mask_image" else "RGB")
    # PIL reports bytes it cannot decode with OSError, SyntaxError, ValueError or EOFError; too large ones with
    # DecompressionBombError.
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise RequestError(name, f"{name} is not an image PIL can read: {e}") from None
    if max(picture.size) > MAX_IMAGE_SIDE:
        raise RequestError(name, f"{name} is {picture.width}x{picture.height} pixels; at most {MAX_IMAGE_SIDE} a "
                                 "side")
    return picture


def _request_id(value, header: str | None) -> str:
    value = value if value is not None else header
    if value is None:
        return secrets.token_hex(8)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID:
        raise RequestError("request_id", f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters")
    return value


def parse_generate(body, model: dict, request_id_header: str | None = None) -> GenerationRequest:
    """A /generate body -> GenerationRequest. `model` is the replica's description (ServedModel.describe())."""
    body = _check_keys(body, GENERATE_FIELDS)
    prompt = _string(body, "prompt", required=True)
    image = mask = None
    if body.get("image") is not None:
        image = decode_image(body["image"], "image")
    if body.get("mask_image") is not None:
        if image is None:
            raise RequestError("mask_image", "mask_image needs image, the picture to inpaint")
        mask = decode_image(body["mask_image"], "mask_image")
    task = TEXT_TO_IMAGE if image is None else IMAGE_TO_IMAGE if mask is None else INPAINTING
    if task == IMAGE_TO_IMAGE:
        for name in ("height", "width"):
            if body.get(name) is not None:
                raise RequestError(name, f"image-to-image takes its size from image; leave out {name}")
    if body.get("strength") is not None and image is None:
        raise RequestError("strength", "strength needs image, the picture to start from")
    num_images = body.get("num_images_per_prompt", 1)
    with _field("num_images_per_prompt"):
        check_int(num_images, "num_images_per_prompt", 1, MAX_IMAGES_PER_REQUEST)
    response_format = body.get("response_format", B64_JSON)
    if response_format not in RESPONSE_FORMATS:
        raise RequestError("response_format", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got "
                                              f"{response_format!r}")
    if response_format == PNG and num_images != 1:
        raise RequestError("response_format", "response_format png returns one image; use b64_json for "
                                              f"num_images_per_prompt {num_images}")
    height, width = _size(body.get("height"), body.get("width"), task, image, model, ("height", "width"))
    return _resolved(body, model, task, prompt, height, width, num_images, image, mask, response_format,
                     _request_id(body.get("request_id"), request_id_header))


def parse_openai(body, model: dict, request_id_header: str | None = None) -> GenerationRequest:
    """An OpenAI images API body (POST /v1/images/generations) -> GenerationRequest: `prompt`, `n`, `size` "WxH",
    `response_format` b64_json (a URL the server does not host: refused); other OpenAI fields (model, quality,
    style, user, ...) are ignored."""
    body = _check_keys(body)
    prompt = _string(body, "prompt", required=True)
    num_images = body.get("n", 1) if body.get("n") is not None else 1
    with _field("n"):
        check_int(num_images, "n", 1, MAX_IMAGES_PER_REQUEST)
    response_format = body.get("response_format") or B64_JSON
    if response_format != B64_JSON:
        raise RequestError("response_format", f"response_format must be b64_json (this server hosts no image URLs), "
                                              f"got {response_format!r}")
    height = width = None
    size = body.get("size")
    if size is not None and size != "auto":
        match = OPENAI_SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise RequestError("size", f"size must be 'WIDTHxHEIGHT' in pixels (e.g. 512x512), got {size!r}")
        width, height = int(match.group(1)), int(match.group(2))
    height, width = _size(height, width, TEXT_TO_IMAGE, None, model, ("size", "size"))
    extensions = {k: body[k] for k in OPENAI_EXTENSIONS if k in body}
    return _resolved(extensions, model, TEXT_TO_IMAGE, prompt, height, width, num_images, None, None, B64_JSON,
                     _request_id(None, request_id_header))


def _size(height, width, task: str, image, model: dict, names: tuple[str, str]) -> tuple[int, int]:
    """The generation's (height, width): given, else the input image's rounded down to the VAE's multiple (as the
    pipelines round it), else the model's default."""
    multiple = model["size_multiple"]
    if image is not None:
        height = height if height is not None else image.height // multiple * multiple
        width = width if width is not None else image.width // multiple * multiple
    height = model["default_height"] if height is None else height
    width = model["default_width"] if width is None else width
    # The field named in an error: OpenAI's `size`; height / width; or, for image-to-image, the image they come from.
    for name, value in zip(names, (height, width)):
        name = "image" if task == IMAGE_TO_IMAGE else name
        with _field(name):
            check_image_size({name: value}, multiple)
    return height, width


def _resolved(body: dict, model: dict, task: str, prompt: str, height: int, width: int, num_images: int, image,
              mask, response_format: str, request_id: str) -> GenerationRequest:
    """The fields both routes share, checked and defaulted from the task pipeline's own defaults."""
    if task not in model["tasks"]:
        # What the request is missing or has too much of: the image inputs that choose the task.
        field_name = "mask_image" if task == INPAINTING else "image"
        raise RequestError(field_name, f"this model cannot do {task}: {model['unavailable'].get(task, '')}")
    defaults = model["tasks"][task]
    negative = _string(body, "negative_prompt")
    steps = body.get("num_inference_steps", defaults["num_inference_steps"])
    with _field("num_inference_steps"):
        check_int(steps, "num_inference_steps", 1, model["max_inference_steps"])
    guidance = body.get("guidance_scale", defaults["guidance_scale"])
    with _field("guidance_scale"):
        check_number(guidance, "guidance_scale")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**63)  # drawn here and returned, so that the image can be asked for again
    with _field("seed"):
        check_int(seed, "seed", 0, MAX_SEED - (num_images - 1))
    scheduler = _string(body, "scheduler")
    if scheduler is not None:
        from diffship.checks import check_scheduler_name

        with _field("scheduler"):
            check_scheduler_name(scheduler, kind=model.get("scheduler_kind"), user=model.get("pipeline") or "this model")
    strength = None
    if task != TEXT_TO_IMAGE:
        from diffship.pipelines.steps import check_strength

        strength = body.get("strength", defaults["strength"])
        with _field("strength"):
            check_strength(strength, steps)
    return GenerationRequest(request_id=request_id, task=task, prompt=prompt, negative_prompt=negative,
                             height=height, width=width, num_inference_steps=steps, guidance_scale=float(guidance),
                             seed=seed, scheduler=scheduler, num_images=num_images, strength=strength, image=image,
                             mask_image=mask, response_format=response_format)
