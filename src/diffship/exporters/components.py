"""What is exported for each component: a wrapper module with the tensor contract of DESIGN.md, and the
example inputs and dynamic axes it is traced with. One short function per component."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ComponentSpec:
    """A traceable module and how to trace it, and the input shapes its graph is validated at."""

    name: str
    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    config_source: object = None  # the diffusers/transformers config written as the component's config.json
    # Input shapes the graph is validated at besides the traced ones (dynamic exports): other batch sizes and
    # sizes, so that a size baked into the graph cannot pass validation.
    other_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)

    def validation_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Every input-shape set the export validates: the traced one first."""
        traced = {name: tuple(t.shape) for name, t in self.example_inputs.items()}
        return [traced] + [{**traced, **other} for other in self.other_shapes if {**traced, **other} != traced]


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


def vae_scale_factor(block_out_channels) -> int:
    """Image pixels per latent pixel: the VAE halves the size at every block but the last (8 for SD's four)."""
    return 2 ** (len(block_out_channels) - 1)


def up_factor(unet) -> int:
    """How many times the UNet upsamples in all: sizes it does not divide need the skip sizes forwarded."""
    return 2 ** unet.num_upsamplers


def not_divisible(size: int, factor: int) -> int:
    """`size`, or the next size up when `factor` divides it (a factor of 1 divides everything: `size` as is)."""
    return size + 1 if factor > 1 and size % factor == 0 else size


def latent_sizes(unet, shapes: "ExportShapes", vae_scale_factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The requested latent (height, width), and the nearest one at or above it that the UNet's up factor does
    not divide (the same when the factor already does not divide it).

    diffusers' UNet forwards each skip connection's size to its upsampler only when the latent is not a multiple
    of its up factor; the tracer records the branch taken, so a graph traced at a multiple would fail at any other
    size (SD 1.5 at 520x520, say). Dynamic graphs are therefore traced at the second size, which forwards the
    sizes, and validated at both; static graphs are traced at the requested latent, the only one they run.
    """
    requested = (shapes.height // vae_scale_factor, shapes.width // vae_scale_factor)
    factor = up_factor(unet)
    return requested, (not_divisible(requested[0], factor), not_divisible(requested[1], factor))


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
        other_shapes=[] if shapes.static else [{"input_ids": (batch + 1, shapes.sequence_length)}],
    )


def unet_spec(unet, shapes: ExportShapes, vae_scale_factor: int, cross_attention_dim: int) -> ComponentSpec:
    # Classifier-free guidance runs the unconditional and conditional batch together.
    batch = 2 * shapes.batch_size
    requested, not_multiple = latent_sizes(unet, shapes, vae_scale_factor)
    h, w = requested if shapes.static else not_multiple
    c = unet.config.in_channels
    sample_axes = {0: "batch_size", 2: "height", 3: "width"}
    # Besides the traced shapes, dynamic graphs are checked at the unguided batch (one image, guidance off), at
    # the requested latent and at one the up factor does not divide, whatever size the trace was made at.
    unguided = {"encoder_hidden_states": (shapes.batch_size, shapes.sequence_length, cross_attention_dim)}
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
        other_shapes=[] if shapes.static else [{"sample": (shapes.batch_size, c, *size), **unguided}
                                               for size in dict.fromkeys((requested, not_multiple))],
    )


def vae_encoder_spec(vae, shapes: ExportShapes, vae_scale_factor: int) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    c = vae.config.in_channels
    return ComponentSpec(
        name="vae_encoder",
        module=_VaeEncoder(vae),
        example_inputs={"sample": torch.rand(shapes.batch_size, c, shapes.height, shapes.width) * 2 - 1},
        output_names=["latent_parameters"],
        dynamic_axes={"sample": _maybe(shapes.static, axes), "latent_parameters": _maybe(shapes.static, axes)},
        config_source=vae.config,
        other_shapes=[] if shapes.static else [
            {"sample": (shapes.batch_size + 1, c, *_other_image_size(shapes, vae_scale_factor))}],
    )


def vae_decoder_spec(vae, shapes: ExportShapes, vae_scale_factor: int) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    c = vae.config.latent_channels
    other_h, other_w = (size // vae_scale_factor for size in _other_image_size(shapes, vae_scale_factor))
    return ComponentSpec(
        name="vae_decoder",
        module=_VaeDecoder(vae),
        example_inputs={"latent_sample": torch.randn(shapes.batch_size, c, h, w)},
        output_names=["sample"],
        dynamic_axes={"latent_sample": _maybe(shapes.static, axes), "sample": _maybe(shapes.static, axes)},
        config_source=vae.config,
        other_shapes=[] if shapes.static else [{"latent_sample": (shapes.batch_size + 1, c, other_h, other_w)}],
    )


def _other_image_size(shapes: ExportShapes, vae_scale_factor: int) -> tuple[int, int]:
    """An image size other than the traced one for the VAE's validation: one latent row and two columns more."""
    return shapes.height + vae_scale_factor, shapes.width + 2 * vae_scale_factor


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
        other_shapes=[] if shapes.static else [
            {"pixel_values": (shapes.batch_size + 1, depth_estimator.config.num_channels, *size)}],
    )


def stable_diffusion_specs(pipe, shapes: ExportShapes) -> list[ComponentSpec]:
    """The components a Stable Diffusion 1.x/2.x pipeline (text-to-image, image-to-image, inpainting or
    depth-to-image: the UNet's in_channels say which) is exported as."""
    scale = vae_scale_factor(pipe.vae.config.block_out_channels)
    specs = [
        text_encoder_spec(pipe.text_encoder, shapes),
        unet_spec(pipe.unet, shapes, scale, pipe.unet.config.cross_attention_dim),
        vae_encoder_spec(pipe.vae, shapes, scale),
        vae_decoder_spec(pipe.vae, shapes, scale),
    ]
    if getattr(pipe, "depth_estimator", None) is not None:
        specs.append(depth_estimator_spec(pipe.depth_estimator, shapes))
    return specs
