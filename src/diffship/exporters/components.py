"""What is exported for each component: a wrapper module with the tensor contract of DESIGN.md, and the
example inputs and dynamic axes it is traced with. One short function per component."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ComponentSpec:
    """A traceable module and how to trace it."""

    name: str
    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    config_source: object = None  # the diffusers/transformers config written as the component's config.json


@dataclass
class ExportShapes:
    """The shapes graphs are traced (and, when static, fixed) at. `batch_size` counts images per call."""

    batch_size: int = 1
    height: int = 512
    width: int = 512
    sequence_length: int = 77
    static: bool = False


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        # hidden_states.N are kept for clip_skip (and SDXL's penultimate layer).
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        # mean and logvar: the pipeline samples (or takes the mean) in numpy with its own generator.
        return self.vae.encode(sample).latent_dist.parameters


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _DepthEstimator(torch.nn.Module):
    def __init__(self, depth_estimator):
        super().__init__()
        self.depth_estimator = depth_estimator

    def forward(self, pixel_values):
        return self.depth_estimator(pixel_values=pixel_values, return_dict=True).predicted_depth


def _maybe(static: bool, axes: dict[int, str]) -> dict[int, str]:
    return {} if static else axes


def text_encoder_spec(text_encoder, shapes: ExportShapes) -> ComponentSpec:
    n_hidden = text_encoder.config.num_hidden_layers + 1
    batch = shapes.batch_size
    return ComponentSpec(
        name="text_encoder",
        module=_TextEncoder(text_encoder),
        example_inputs={"input_ids": torch.randint(0, text_encoder.config.vocab_size, (batch, shapes.sequence_length))},
        output_names=["last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(n_hidden)],
        dynamic_axes={
            name: _maybe(shapes.static, {0: "batch_size", 1: "sequence_length"} if name != "pooler_output" else {0: "batch_size"})
            for name in ["input_ids", "last_hidden_state", "pooler_output"] + [f"hidden_states.{i}" for i in range(n_hidden)]
        },
        config_source=text_encoder.config,
    )


def unet_spec(unet, shapes: ExportShapes, vae_scale_factor: int, cross_attention_dim: int) -> ComponentSpec:
    # Classifier-free guidance runs the unconditional and conditional batch together.
    batch = 2 * shapes.batch_size
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    c = unet.config.in_channels
    sample_axes = {0: "batch_size", 2: "height", 3: "width"}
    return ComponentSpec(
        name="unet",
        module=_UNet(unet),
        example_inputs={
            "sample": torch.randn(batch, c, h, w),
            # Rank-0 float, as Optimum's ONNX exports take it: fractional timesteps (Karras sigmas) stay exact.
            "timestep": torch.tensor(981.0),
            "encoder_hidden_states": torch.randn(batch, shapes.sequence_length, cross_attention_dim),
        },
        output_names=["out_sample"],
        dynamic_axes={
            "sample": _maybe(shapes.static, sample_axes),
            "encoder_hidden_states": _maybe(shapes.static, {0: "batch_size", 1: "sequence_length"}),
            "out_sample": _maybe(shapes.static, sample_axes),
        },
        config_source=unet.config,
    )


def vae_encoder_spec(vae, shapes: ExportShapes) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    return ComponentSpec(
        name="vae_encoder",
        module=_VaeEncoder(vae),
        example_inputs={"sample": torch.rand(shapes.batch_size, vae.config.in_channels, shapes.height, shapes.width) * 2 - 1},
        output_names=["latent_parameters"],
        dynamic_axes={"sample": _maybe(shapes.static, axes), "latent_parameters": _maybe(shapes.static, axes)},
        config_source=vae.config,
    )


def vae_decoder_spec(vae, shapes: ExportShapes, vae_scale_factor: int) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    return ComponentSpec(
        name="vae_decoder",
        module=_VaeDecoder(vae),
        example_inputs={"latent_sample": torch.randn(shapes.batch_size, vae.config.latent_channels, h, w)},
        output_names=["sample"],
        dynamic_axes={"latent_sample": _maybe(shapes.static, axes), "sample": _maybe(shapes.static, axes)},
        config_source=vae.config,
    )


def depth_estimator_spec(depth_estimator, shapes: ExportShapes) -> ComponentSpec:
    """DPTForDepthEstimation: pixel_values [B,3,S,S] -> predicted_depth [B,h,w]. Height and width stay fixed at the
    DPT's image_size (the size its feature extractor resizes every image to): ViT position embeddings are resized
    with Python ints at trace time, so a graph traced at one size would be wrong at another."""
    size = depth_estimator.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ComponentSpec(
        name="depth_estimator",
        module=_DepthEstimator(depth_estimator),
        example_inputs={"pixel_values": torch.randn(shapes.batch_size, depth_estimator.config.num_channels, *size)},
        output_names=["predicted_depth"],
        dynamic_axes={"pixel_values": _maybe(shapes.static, {0: "batch_size"}),
                      "predicted_depth": _maybe(shapes.static, {0: "batch_size"})},
        config_source=depth_estimator.config,
    )


def stable_diffusion_specs(pipe, shapes: ExportShapes) -> list[ComponentSpec]:
    """The components a Stable Diffusion 1.x/2.x pipeline (text-to-image, image-to-image, inpainting or
    depth-to-image: the UNet's in_channels say which) is exported as."""
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    specs = [
        text_encoder_spec(pipe.text_encoder, shapes),
        unet_spec(pipe.unet, shapes, vae_scale_factor, pipe.unet.config.cross_attention_dim),
        vae_encoder_spec(pipe.vae, shapes),
        vae_decoder_spec(pipe.vae, shapes, vae_scale_factor),
    ]
    if getattr(pipe, "depth_estimator", None) is not None:
        specs.append(depth_estimator_spec(pipe.depth_estimator, shapes))
    return specs
