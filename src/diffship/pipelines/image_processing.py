"""Image conversions between the VAE's [-1, 1] NCHW arrays and what users hold (PIL images, [0, 1] NHWC arrays)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from diffship.checks import MAX_IMAGE_SIDE

OUTPUT_TYPES = ("pil", "np", "latent")


def denormalize(sample: np.ndarray) -> np.ndarray:
    """VAE output [-1, 1] NCHW -> [0, 1] NHWC float32."""
    return np.clip(sample / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32, copy=False)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """[0, 1] NHWC floats -> PIL images, rounded as diffusers rounds them."""
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def postprocess(sample: np.ndarray, output_type: str = "pil"):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return sample
    images = denormalize(sample)
    return numpy_to_pil(images) if output_type == "pil" else images


# ---- input images: diffusers' VaeImageProcessor.preprocess, in numpy ---------------------------------------------
# diffusers resizes PIL images with PIL (the processor's `resample`, lanczos by default) and numpy arrays with
# torch's nearest interpolation; both are mirrored exactly here, because resampling choices move pixels by far
# more than the parity tolerance.

PIL_INTERPOLATION = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
IMAGE_FORMATS = "a PIL image, a numpy array in [0, 1] of shape (H, W, C) or (N, H, W, C), or a list of either"


def is_valid_image(image) -> bool:
    return isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim in (2, 3))


def is_valid_image_imagelist(images) -> bool:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return True
    if is_valid_image(images):
        return True
    return isinstance(images, list) and len(images) > 0 and all(is_valid_image(i) for i in images)


def _describe(image) -> str:
    if isinstance(image, np.ndarray):
        return f"a numpy array of shape {image.shape}"
    if isinstance(image, list):
        return f"a list of {', '.join(sorted({_describe(i) for i in image})) or 'nothing'}"
    return f"a {type(image).__name__}"


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of torch's `interpolate(mode="nearest")` (float32 scale, floor, clamp)."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def interpolate_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size) (mode "nearest") on an NCHW array."""
    return x[:, :, _nearest_indices(x.shape[2], size[0])][:, :, :, _nearest_indices(x.shape[3], size[1])]


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """The (n_out, n_in) matrix of torch's bicubic interpolation, align_corners=False (Keys kernel, a=-0.75,
    border pixels repeated)."""
    scale = np.float32(n_in) / np.float32(n_out)
    real = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    index = np.floor(real).astype(np.int64)
    t = (real - index).astype(np.float64)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    columns = np.clip(index[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    matrix = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(matrix, (np.arange(n_out), columns[:, k]), weights[:, k])
    return matrix


def interpolate_bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False) on an NCHW array."""
    rows, cols = _bicubic_matrix(x.shape[2], size[0]), _bicubic_matrix(x.shape[3], size[1])
    return np.einsum("oh,nchw,pw->ncop", rows, x.astype(np.float64), cols).astype(np.float32)


class VaeImageProcessor:
    """diffusers' VaeImageProcessor (its preprocess, crop region and overlay) without torch.

    `preprocess` takes PIL images, numpy arrays in [0, 1] (HW, HWC or NHWC) or lists of either and returns float32
    NCHW, normalized to [-1, 1] (images) or binarized to {0, 1} (masks). `name` is the argument named in errors.
    """

    def __init__(self, vae_scale_factor: int = 8, resample: str = "lanczos", do_resize: bool = True,
                 do_normalize: bool = True, do_binarize: bool = False, do_convert_grayscale: bool = False):
        self.vae_scale_factor = vae_scale_factor
        self.resample = resample
        self.do_resize = do_resize
        self.do_normalize = do_normalize
        self.do_binarize = do_binarize
        self.do_convert_grayscale = do_convert_grayscale

    def get_default_height_width(self, image, height: int | None = None, width: int | None = None,
                                 name: str = "image"):
        """(height, width): given, or the image's, rounded down to a multiple of vae_scale_factor (as diffusers
        does, so that the latents decode to that size); `name` is the argument named when the result is out of
        range."""
        if height is None:
            height = image.height if isinstance(image, Image.Image) else image.shape[2]
        if width is None:
            width = image.width if isinstance(image, Image.Image) else image.shape[3]
        rounded = height - height % self.vae_scale_factor, width - width % self.vae_scale_factor
        if not all(self.vae_scale_factor <= side <= MAX_IMAGE_SIDE for side in rounded):
            raise ValueError(
                f"{name} is {height}x{width} pixels; its sides, rounded down to a multiple of {self.vae_scale_factor}"
                f" (the VAE's scale factor), must be from {self.vae_scale_factor} to {MAX_IMAGE_SIDE} pixels"
            )
        return rounded

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        if resize_mode != "default" and not isinstance(image, Image.Image):
            raise ValueError(f"resize_mode {resize_mode!r} needs PIL images")
        if isinstance(image, Image.Image):
            if resize_mode == "default":
                return image.resize((width, height), resample=PIL_INTERPOLATION[self.resample])
            if resize_mode == "fill":
                return self._resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return self._resize_and_crop(image, width, height)
            raise ValueError(f"resize_mode {resize_mode!r} is not one of default, fill, crop")
        return interpolate_nearest(image, (height, width))

    def _resize_and_fill(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """Fit inside (width, height) keeping the aspect ratio; fill the borders by stretching the edge pixels."""
        ratio = width / height
        src_ratio = image.width / image.height
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=PIL_INTERPOLATION[self.resample])
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                          box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill_width + src_w, 0))
        return res

    def _resize_and_crop(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """Cover (width, height) keeping the aspect ratio; crop what sticks out, centred."""
        ratio = width / height
        src_ratio = image.width / image.height
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=PIL_INTERPOLATION[self.resample])
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res

    @staticmethod
    def get_crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0):
        """(x1, y1, x2, y2): the box around the mask's non-zero pixels, padded by `pad` and grown to the aspect
        ratio of (width, height), within the image (diffusers' rule, for `padding_mask_crop`)."""
        mask = np.array(mask_image.convert("L"))
        h, w = mask.shape
        cols = np.flatnonzero((mask != 0).any(axis=0))
        rows = np.flatnonzero((mask != 0).any(axis=1))
        # diffusers counts the empty columns/rows from each side; an empty mask counts all of them.
        crop_left = int(cols[0]) if cols.size else w
        crop_right = int(w - 1 - cols[-1]) if cols.size else w
        crop_top = int(rows[0]) if rows.size else h
        crop_bottom = int(h - 1 - rows[-1]) if rows.size else h
        x1, y1 = int(max(crop_left - pad, 0)), int(max(crop_top - pad, 0))
        x2, y2 = int(min(w - crop_right + pad, w)), int(min(h - crop_bottom + pad, h))
        ratio_crop_region = (x2 - x1) / (y2 - y1)
        ratio_processing = width / height
        if ratio_crop_region > ratio_processing:
            desired_height = (x2 - x1) / ratio_processing
            desired_height_diff = int(desired_height - (y2 - y1))
            y1 -= desired_height_diff // 2
            y2 += desired_height_diff - desired_height_diff // 2
            if y2 >= mask_image.height:
                diff = y2 - mask_image.height
                y2 -= diff
                y1 -= diff
            if y1 < 0:
                y2 -= y1
                y1 -= y1
            if y2 >= mask_image.height:
                y2 = mask_image.height
        else:
            desired_width = (y2 - y1) * ratio_processing
            desired_width_diff = int(desired_width - (x2 - x1))
            x1 -= desired_width_diff // 2
            x2 += desired_width_diff - desired_width_diff // 2
            if x2 >= mask_image.width:
                diff = x2 - mask_image.width
                x2 -= diff
                x1 -= diff
            if x1 < 0:
                x2 -= x1
                x1 -= x1
            if x2 >= mask_image.width:
                x2 = mask_image.width
        return x1, y1, x2, y2

    def apply_overlay(self, mask: Image.Image, init_image: Image.Image, image: Image.Image,
                      crop_coords: tuple[int, int, int, int] | None = None) -> Image.Image:
        """Paste the generated crop back into the original image, keeping the original outside the mask."""
        width, height = init_image.width, init_image.height
        init_image_masked = Image.new("RGBa", (width, height))
        init_image_masked.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
        init_image_masked = init_image_masked.convert("RGBA")
        if crop_coords is not None:
            x, y, x2, y2 = crop_coords
            base_image = Image.new("RGBA", (width, height))
            image = self.resize(image, height=y2 - y, width=x2 - x, resize_mode="crop")
            base_image.paste(image, (x, y))
            image = base_image.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(init_image_masked)
        return image.convert("RGB")

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords: tuple[int, int, int, int] | None = None, name: str = "image") -> np.ndarray:
        if isinstance(image, np.ndarray) and image.ndim == 3 and self.do_convert_grayscale:
            # (H, W, 1) is one grayscale image; (N, H, W) a batch of them.
            image = image[None] if image.shape[-1] == 1 else image[..., None]
        if isinstance(image, list) and image and isinstance(image[0], np.ndarray) and image[0].ndim == 4:
            image = np.concatenate(image, axis=0)
        if isinstance(image, tuple):
            image = list(image)
        if not is_valid_image_imagelist(image):
            raise ValueError(f"{name} must be {IMAGE_FORMATS}; got {_describe(image)}")
        if not isinstance(image, list):
            image = [image]
        if isinstance(image[0], Image.Image):
            if not all(isinstance(i, Image.Image) for i in image):
                raise ValueError(f"{name}: a list must hold PIL images only or numpy arrays only")
            if crops_coords is not None:
                image = [i.crop(crops_coords) for i in image]
            if self.do_resize:
                height, width = self.get_default_height_width(image[0], height, width, name)
                image = [self.resize(i, height, width, resize_mode=resize_mode) for i in image]
            if self.do_convert_grayscale:
                image = [i.convert("L") for i in image]
            elif image[0].mode != "RGB":
                # diffusers passes other modes through (RGBA would then be taken for 4-channel latents); the VAE
                # takes RGB.
                image = [i.convert("RGB") for i in image]
            array = np.stack([np.array(i).astype(np.float32) / 255.0 for i in image], axis=0)
        else:
            if not all(isinstance(i, np.ndarray) for i in image):
                raise ValueError(f"{name}: a list must hold PIL images only or numpy arrays only")
            if not all(np.issubdtype(i.dtype, np.floating) for i in image):
                raise ValueError(
                    f"{name}: numpy images must be floats in [0, 1]; got {image[0].dtype} (divide uint8 by 255)"
                )
            if len({i.shape for i in image}) > 1:
                raise ValueError(f"{name}: the numpy images in a list must have one shape; got "
                                 f"{sorted({i.shape for i in image})}")
            array = np.concatenate(image, axis=0) if image[0].ndim == 4 else np.stack(image, axis=0)
        if array.ndim == 3:
            array = array[..., None]
        array = np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32)
        if not isinstance(image[0], Image.Image):
            height, width = self.get_default_height_width(array, height, width, name)
            if self.do_resize:
                array = self.resize(array, height, width)
        do_normalize = self.do_normalize
        if do_normalize and array.min() < 0:
            warnings.warn(f"{name} has values below 0: taken as already in [-1, 1] (diffusers' deprecated "
                          "convention); pass images in [0, 1]", FutureWarning, stacklevel=3)
            do_normalize = False
        if do_normalize:
            array = 2.0 * array - 1.0
        if self.do_binarize:
            array = np.where(array < 0.5, 0.0, 1.0).astype(np.float32)
        return array.astype(np.float32, copy=False)


# ---- the depth estimator's input: transformers' DPTImageProcessor (PIL backend), in numpy ------------------------

def _dpt_output_size(height: int, width: int, size: tuple[int, int], keep_aspect_ratio: bool, multiple: int):
    def constrain_to_multiple_of(val, min_val=0):
        x = round(val / multiple) * multiple
        if x < min_val:
            x = math.ceil(val / multiple) * multiple
        return x

    scale_height, scale_width = size[0] / height, size[1] / width
    if keep_aspect_ratio:  # scale as little as possible
        if abs(1 - scale_width) < abs(1 - scale_height):
            scale_height = scale_width
        else:
            scale_width = scale_height
    return constrain_to_multiple_of(scale_height * height), constrain_to_multiple_of(scale_width * width)


def dpt_preprocess(images, settings: dict) -> np.ndarray:
    """pixel_values [N, 3, H, W] for a DPT depth estimator, from its preprocessor_config.json `settings`: resize
    with PIL (bicubic by default), rescale by 1/255, normalize by mean and std, as transformers'
    DPTImageProcessor does with its PIL backend. numpy images in [0, 1] are first made 8-bit, like the PIL images
    the processor expects."""
    images = [images] if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4) \
        else list(images)
    size = settings.get("size", {"height": 384, "width": 384})
    size = (size, size) if isinstance(size, int) else (size["height"], size["width"])
    mean = np.asarray(settings.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)[:, None, None]
    std = np.asarray(settings.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)[:, None, None]
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            pixels = np.array(image.convert("RGB") if image.mode != "RGB" else image)
        else:
            pixels = (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).round().astype(np.uint8)
            pixels = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
        if settings.get("do_resize", True):
            height, width = _dpt_output_size(pixels.shape[0], pixels.shape[1], size,
                                             settings.get("keep_aspect_ratio", False),
                                             settings.get("ensure_multiple_of", 1))
            resample = settings.get("resample", Image.Resampling.BICUBIC)
            pixels = np.array(Image.fromarray(pixels).resize((width, height), resample=resample))
        pixels = pixels.transpose(2, 0, 1)
        if settings.get("do_rescale", True):
            pixels = (pixels.astype(np.float64) * settings.get("rescale_factor", 1 / 255)).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if settings.get("do_normalize", True):
            pixels = (pixels - mean) / std
        divisor = settings.get("size_divisor")
        if settings.get("do_pad", False) and divisor:
            pads = [(0, 0)]
            for n in pixels.shape[1:]:
                extra = math.ceil(n / divisor) * divisor - n
                pads.append((extra // 2, extra - extra // 2))
            pixels = np.pad(pixels, pads)
        out.append(pixels)
    return np.stack(out).astype(np.float32, copy=False)
