"""ControlNet at run time, for every family: the control images, the per-step schedule of each net's scale, and the
residuals the ControlNets hand their UNet at each step. No torch.

An export with ControlNets (`diffship export MODEL OUT --controlnet CN [--controlnet CN2]`) holds their graphs in
controlnet/, controlnet_1/, ... and a UNet that takes the residuals as inputs (down_block_additional_residuals.N,
mid_block_additional_residual). The denoising loop (DiffusionPipeline.denoise) asks `pipe.control_residuals` for
them at every step: a generation's `ControlNetConditioning` runs the nets and sums what they give (MultiControlNet);
without one -- a plain StableDiffusionPipeline on such an export -- the residuals are zeros, which is the UNet
without ControlNet, exactly.

As diffusers' ControlNet pipelines: the control image is resized to the generation's size (its own when none is
given), kept in [0, 1] RGB (VaeImageProcessor with do_convert_rgb, do_normalize=False), repeated over the batch
and, with guidance, over both halves; a net's scale is 0 outside its control_guidance_start/end fraction of the
steps; guess_mode runs the nets on the conditional half only (zeros for the unconditional one), their residuals
scaled from 0.1 (the shallowest) to 1 (the mid block) geometrically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffship.checks import check_number
from diffship.errors import DiffshipError
from diffship.layout import (
    CONTROLNET,
    DOWN_BLOCK_ADDITIONAL_RESIDUAL,
    DOWN_BLOCK_RES_SAMPLE,
    MID_BLOCK_ADDITIONAL_RESIDUAL,
    MID_BLOCK_RES_SAMPLE,
    controlnet_folder,
)
from diffship.pipelines.image_processing import VaeImageProcessor
from diffship.pipelines.steps import tile_to_batch
from diffship.pipelines.timing import CONTROLNET_STAGE
from diffship.runtimes import holds_graph
# The UNet inputs a ControlNet's conditioning is taken from (its own inputs of these names), and its own inputs.
_CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")
_CONTROL_INPUTS = ("sample", "timestep", "controlnet_cond", "conditioning_scale")


def controlnet_names(model_dir: Path) -> list[str]:
    """The ControlNet folders of an export that hold a graph, in order: controlnet, controlnet_1, ..."""
    names = []
    while holds_graph(Path(model_dir) / controlnet_folder(len(names))):
        names.append(controlnet_folder(len(names)))
    return names


def residual_shapes(unet_config, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """The shapes of the residuals a ControlNet adds to its UNet at a latent of height x width: one per skip of the
    down path (conv_in's, each layer's, each downsampler's: sizes rounded up as a stride-2 convolution does), then
    the mid block's. From the UNet's config (block_out_channels, layers_per_block)."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    shapes = [(batch, channels[0], height, width)]
    for level, width_ in enumerate(channels):
        shapes += [(batch, width_, height, width)] * layers[level]
        if level < len(channels) - 1:
            height, width = -(-height // 2), -(-width // 2)
            shapes.append((batch, width_, height, width))
    return shapes + [(batch, channels[-1], height, width)]


def residual_input_count(unet) -> int:
    """How many down-block residuals the UNet graph takes (0: a UNet exported without ControlNet)."""
    prefix = DOWN_BLOCK_ADDITIONAL_RESIDUAL.format("")
    return sum(1 for info in unet.inputs if info.name.startswith(prefix))


def down_output_count(controlnet) -> int:
    prefix = DOWN_BLOCK_RES_SAMPLE.format("")
    return sum(1 for info in controlnet.outputs if info.name.startswith(prefix))


def check_controlnets(controlnets: list, unet, where) -> None:
    """Each ControlNet graph must hand the UNet as many residuals as it takes: a ControlNet of another family (an
    SDXL one with an SD 1.x UNet) or a UNet exported without ControlNet is named here, before any work."""
    taken = residual_input_count(unet) if unet is not None else 0
    if controlnets and not taken:
        raise DiffshipError(f"the UNet of{where} takes no ControlNet residuals; export the model with "
                            "`diffship export MODEL OUT --controlnet CONTROLNET`")
    unet_inputs = {info.name: info for info in unet.inputs} if unet is not None else {}
    advice = "a ControlNet of another model family; export it with its own base model"
    for i, controlnet in enumerate(controlnets):
        name = controlnet_folder(i)
        given = down_output_count(controlnet)
        if given != taken:
            raise DiffshipError(f"{name} of{where} outputs {given} down-block residuals but the UNet takes {taken}: "
                                f"{advice}")
        for info in controlnet.inputs:
            if info.name in _CONTROL_INPUTS:
                continue
            if info.name not in unet_inputs:
                raise DiffshipError(f"{name} of{where} takes {info.name}, which the UNet does not: {advice}")
            theirs = unet_inputs[info.name].shape
            if any(isinstance(a, int) and isinstance(b, int) and a != b
                   for a, b in zip(info.shape[1:], theirs[1:])):
                raise DiffshipError(f"{name} of{where} takes {info.name} of shape {list(info.shape)}, the UNet "
                                    f"{list(theirs)}: {advice}")
        residuals = {o.name: o.shape for o in controlnet.outputs}
        for k in range(given + 1):
            output = DOWN_BLOCK_RES_SAMPLE.format(k) if k < given else MID_BLOCK_RES_SAMPLE
            unet_name = DOWN_BLOCK_ADDITIONAL_RESIDUAL.format(k) if k < given else MID_BLOCK_ADDITIONAL_RESIDUAL
            mine, theirs = residuals.get(output), unet_inputs[unet_name].shape if unet_name in unet_inputs else None
            if mine is not None and theirs is not None and isinstance(mine[1], int) and isinstance(theirs[1], int) \
                    and mine[1] != theirs[1]:
                raise DiffshipError(f"{name} of{where} outputs {output} with {mine[1]} channels, the UNet's "
                                    f"{unet_name} takes {theirs[1]}: {advice}")


def _as_list(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} ControlNets; give one per ControlNet (or one "
                         "for all)")
    return values


def _image_size(image) -> tuple[int, int] | None:
    """(height, width) of a user's image (PIL, numpy HW/HWC/NHWC, or a list of either: the first's)."""
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return tuple(image.shape[1:3]) if image.ndim == 4 else tuple(image.shape[:2])
    return None


def image_size(pipe, image, height, width, name: str) -> tuple[int, int]:
    """The size `image` comes out of preprocessing at: height and width when given, else its own rounded down to
    the VAE's multiple (as diffusers' VaeImageProcessor)."""
    size = _image_size(image)
    if size is None:
        return height, width
    return pipe.image_processor.get_default_height_width(
        np.empty((1, 1, *size)), height, width, name)


def prompt_batch(prompt, prompt_embeds) -> int:
    """How many prompts a call has (the control images must be one, or one per prompt)."""
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    return len(prompt_embeds) if prompt_embeds is not None else 1


def prepare_control(pipe, control: ControlNetConditioning, image, height, width, batch_size, crops_coords=None,
                    resize_mode="default") -> tuple[int, int]:
    """The control images preprocessed (numpy only: before any graph runs) at height x width, or at their own size
    (which must be one); for a task that edits `image`, that size must be the one `image` comes out at: a control
    image of another size is refused, naming both. Returns the generation's size."""
    control.preprocess(pipe, height, width, batch_size, crops_coords, resize_mode)
    if image is None:  # text-to-image: the control images' size
        return control.height, control.width
    size = image_size(pipe, image, height, width, "image")
    if crops_coords is None:
        control.check_size(*size, "image")
    return size


class ControlNetConditioning:
    """One generation's ControlNet inputs, checked when made (before any graph runs): `image` (one control image,
    or a batch, per ControlNet: a list of them for several), `conditioning_scale`, `guidance_start` and
    `guidance_end` (a value, or one per ControlNet), `guess_mode`. `name`: the argument the images came as
    (`image` in text-to-image, `control_image` elsewhere)."""

    def __init__(self, pipe, image, conditioning_scale=1.0, guidance_start=0.0, guidance_end=1.0, guess_mode=False,
                 name: str = "image"):
        nets = pipe.controlnets
        if not nets:
            raise DiffshipError(f"{type(pipe).__name__} needs ControlNets: load an export made with --controlnet")
        self.name, n = name, len(nets)
        if image is None:
            raise ValueError(f"{type(pipe).__name__} needs {name}, the ControlNet's conditioning image")
        if n > 1:
            if not isinstance(image, (list, tuple)) or len(image) != n:
                count = len(image) if isinstance(image, (list, tuple)) else 1
                raise ValueError(f"{name}: {count} conditioning images for {n} ControlNets; give a list with one "
                                 "image (or batch of images) per ControlNet")
            self.images = list(image)
        else:
            self.images = [image]
        if n == 1 and isinstance(conditioning_scale, (list, tuple)):
            conditioning_scale = conditioning_scale[:1]  # diffusers takes the first for a single ControlNet
        self.scales = _as_list(conditioning_scale, n, "controlnet_conditioning_scale")
        for scale in self.scales:
            check_number(scale, "controlnet_conditioning_scale")
        # diffusers' alignment: a list on one side sets the count, a value on the other is repeated.
        if isinstance(guidance_start, (list, tuple)) and not isinstance(guidance_end, (list, tuple)):
            guidance_end = [guidance_end] * len(guidance_start)
        elif isinstance(guidance_end, (list, tuple)) and not isinstance(guidance_start, (list, tuple)):
            guidance_start = [guidance_start] * len(guidance_end)
        self.starts = _as_list(guidance_start, n, "control_guidance_start")
        self.ends = _as_list(guidance_end, n, "control_guidance_end")
        for start, end in zip(self.starts, self.ends):
            check_number(start, "control_guidance_start", 0.0, 1.0)
            check_number(end, "control_guidance_end", 0.0, 1.0)
            if start >= end:
                raise ValueError(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        # As diffusers: a ControlNet that pools its conditions (shuffle) always runs in guess mode.
        self.global_pool = bool(nets[0].config.get("global_pool_conditions", False))
        self.guess_mode = guess_mode or self.global_pool
        self.channels = [int(net.config.get("conditioning_channels", 3)) for net in nets]

    def preprocess(self, pipe, height, width, batch_size, crops_coords=None, resize_mode="default") -> None:
        """The control images -> float32 NCHW in [0, 1] at height x width (when None, each at its own size), checked:
        RGB, one image or one per prompt (`batch_size` prompts), all at one size (self.height, self.width). Numpy
        work only: runs before any graph."""
        processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False)
        arrays = []
        for i, (image, channels) in enumerate(zip(self.images, self.channels)):
            name = self.name if len(self.images) == 1 else f"{self.name}[{i}]"
            array = processor.preprocess(image, height=height, width=width, crops_coords=crops_coords,
                                         resize_mode=resize_mode, name=name)
            if array.shape[1] != channels:
                raise ValueError(f"{name} has {array.shape[1]} channels; the ControlNet takes {channels} (RGB "
                                 "images)")
            if array.shape[0] not in (1, batch_size):
                raise ValueError(f"{name} holds {array.shape[0]} images for {batch_size} prompts; give one image, "
                                 "or one per prompt")
            arrays.append(array)
        sizes = sorted({a.shape[2:] for a in arrays})
        if len(sizes) > 1:
            raise ValueError(f"{self.name}: the conditioning images come out at different sizes "
                             f"({', '.join(f'{h}x{w}' for h, w in sizes)}); give images of one size, or height and "
                             "width")
        self.arrays = arrays
        self.height, self.width = (int(d) for d in arrays[0].shape[2:])

    def check_size(self, height: int, width: int, name: str) -> None:
        """The generation's latents (from `name`, the image being edited) must be at the control images' size."""
        if (height, width) != (self.height, self.width):
            raise ValueError(f"{self.name} is {self.height}x{self.width} but {name} is {height}x{width}; give them "
                             "one size, or height and width to resize both")

    def start(self, images: int, num_images_per_prompt: int, do_classifier_free_guidance: bool, timesteps) -> None:
        """Called by the family's generate once the batch and the steps are known: the control images over the
        batch (and both guidance halves unless guess_mode), and each net's scale at each step."""
        self.do_classifier_free_guidance = do_classifier_free_guidance
        self.conditional_only = self.guess_mode and do_classifier_free_guidance
        prepared = []
        for array in self.arrays:
            array = np.repeat(array, images if array.shape[0] == 1 else num_images_per_prompt, axis=0)
            array = tile_to_batch(array, images, self.name)
            if do_classifier_free_guidance and not self.guess_mode:
                array = np.concatenate([array] * 2)
            prepared.append(np.ascontiguousarray(array, dtype=np.float32))
        self.prepared = prepared
        n = len(timesteps)
        self.keep = [[1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(self.starts, self.ends)]
                     for i in range(n)]

    def residuals(self, pipe, i: int, t, latent_model_input: np.ndarray, feeds: dict, timer) -> dict:
        """The UNet's residual inputs at step i: each net run on the step's latents (before a task's extra
        channels) and the UNet's conditioning, scaled, summed over the nets. A net whose scale is 0 at this step
        is not run: its residuals would be zeros."""
        down, mid = None, None
        half = latent_model_input.shape[0] // 2
        for net, image, scale, keep in zip(pipe.controlnets, self.prepared, self.scales, self.keep[i]):
            scale = float(scale) * keep
            if scale == 0.0:
                continue
            sample = latent_model_input[half:] if self.conditional_only else latent_model_input
            control_feeds = {"sample": sample, "timestep": pipe.timestep_feed(t, sample.shape[0], net),
                             "controlnet_cond": image,
                             # guess_mode scales each residual apart, below: the graph's is then 1.
                             "conditioning_scale": np.asarray(1.0 if self._geometric else scale, np.float32)}
            names = {info.name for info in net.inputs}
            for key in _CONDITIONING:
                if key in names:
                    value = feeds[key]
                    control_feeds[key] = value[value.shape[0] // 2:] if self.conditional_only else value
            with timer.stage(CONTROLNET_STAGE):
                outputs = net.run(control_feeds)
            n_down = down_output_count(net)
            net_down = [outputs[DOWN_BLOCK_RES_SAMPLE.format(k)] for k in range(n_down)]
            net_mid = outputs[MID_BLOCK_RES_SAMPLE]
            if self._geometric:
                scales = np.logspace(-1, 0, n_down + 1, dtype=np.float32) * np.float32(scale)
                net_down = [d * s for d, s in zip(net_down, scales)]
                net_mid = net_mid * scales[-1]
            if self.conditional_only:
                net_down = [np.concatenate([np.zeros_like(d), d]) for d in net_down]
                net_mid = np.concatenate([np.zeros_like(net_mid), net_mid])
            down = net_down if down is None else [a + b for a, b in zip(down, net_down)]
            mid = net_mid if mid is None else mid + net_mid
        if down is None:
            return zero_residuals(pipe, feeds)
        return {**{DOWN_BLOCK_ADDITIONAL_RESIDUAL.format(k): d.astype(np.float32, copy=False)
                   for k, d in enumerate(down)},
                MID_BLOCK_ADDITIONAL_RESIDUAL: mid.astype(np.float32, copy=False)}

    @property
    def _geometric(self) -> bool:
        """guess_mode's residual scales (0.1 to 1), which diffusers skips for ControlNets that pool their
        conditions."""
        return self.guess_mode and not self.global_pool


def zero_residuals(pipe, feeds: dict) -> dict:
    """Zeros for every residual input of the UNet (none if it takes none): the UNet as it is without ControlNet."""
    if pipe.unet is None or not residual_input_count(pipe.unet):
        return {}
    batch, _, height, width = feeds["sample"].shape
    shapes = residual_shapes(pipe.unet_config, batch, height, width)
    names = [DOWN_BLOCK_ADDITIONAL_RESIDUAL.format(k) for k in range(len(shapes) - 1)] + \
        [MID_BLOCK_ADDITIONAL_RESIDUAL]
    return {name: np.zeros(shape, np.float32) for name, shape in zip(names, shapes)}


__all__ = ["CONTROLNET", "CONTROLNET_STAGE", "ControlNetConditioning", "check_controlnets", "controlnet_names",
           "image_size", "prepare_control", "prompt_batch", "residual_shapes", "zero_residuals"]
