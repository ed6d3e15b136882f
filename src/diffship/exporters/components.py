"""The export pieces every family builds its components from: a wrapper module with the tensor contract of
docs/architecture.md, and the example inputs and dynamic axes it is traced with. One short function per kind of
component; a family module (diffship.families) says which it exports, under which role, with what inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from diffship.errors import DiffshipError
from diffship.layout import (
    DEEP_FEATURES,
    DEPTH_ESTIMATOR,
    DOWN_BLOCK_ADDITIONAL_RESIDUAL,
    DOWN_BLOCK_RES_SAMPLE,
    MID_BLOCK_ADDITIONAL_RESIDUAL,
    MID_BLOCK_RES_SAMPLE,
    SKIP_LAYERS,
    TRANSFORMER,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)


@dataclass
class ComponentSpec:
    """A traceable module and how to trace it, and the input shapes its graph is validated at."""

    name: str
    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    config_source: object = None  # the diffusers/transformers config written as the component's config.json
    atol: float = 1e-3  # the fp32 max-abs bound its validation is judged by (the family states it, and why)
    # Files the runtime needs beside the graph, written into the component's folder: (folder) -> None.
    write_extra: Callable[[Path], None] | None = None
    # Whether the export may drop `module` once it is traced (nothing else holds it: the reference outputs are
    # computed by then), so that its weights are not in memory while the runtimes load the graph.
    release_after_trace: bool = False
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
        if hasattr(out, "text_embeds"):
            # CLIPTextModelWithProjection (SDXL's text_encoder_2) pools through its projection, and its pooled
            # embedding comes first, as in Optimum's exports: diffusers' SDXL pipelines (Optimum's too) take the
            # pooled embedding as the encoder's output 0.
            return (out.text_embeds, out.last_hidden_state, *out.hidden_states)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


# UNet inputs -> where diffusers' UNet2DConditionModel.forward takes them.
_ADDED_CONDITIONS = ("text_embeds", "time_ids")


_DOWN_RESIDUAL_PREFIX = DOWN_BLOCK_ADDITIONAL_RESIDUAL.format("")


class _UNet(torch.nn.Module):
    """sample, timestep, then the conditioning inputs by name: encoder_hidden_states, timestep_cond (LCM), and
    text_embeds / time_ids (SDXL's added conditions); with ControlNet, the residuals (down_block_additional_
    residuals.N in order, then mid_block_additional_residual)."""

    def __init__(self, unet, conditioning: list[str]):
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning

    def forward(self, sample, timestep, *conditioning):
        given = dict(zip(self.conditioning, conditioning))
        added = {k: given.pop(k) for k in _ADDED_CONDITIONS if k in given}
        down = tuple(given.pop(k) for k in self.conditioning if k.startswith(_DOWN_RESIDUAL_PREFIX))
        if down:
            given["down_block_additional_residuals"] = down
            given["mid_block_additional_residual"] = given.pop(MID_BLOCK_ADDITIONAL_RESIDUAL)
        return self.unet(sample, timestep, added_cond_kwargs=added or None, return_dict=False, **given)[0]


class _ControlNet(torch.nn.Module):
    """sample, timestep, the UNet's conditioning inputs by name (encoder_hidden_states; SDXL's text_embeds and
    time_ids), controlnet_cond (the control image, [B, 3, H, W] in [0, 1]) and conditioning_scale (rank 0) ->
    down_block_res_samples.0..N, mid_block_res_sample."""

    def __init__(self, controlnet, conditioning: list[str]):
        super().__init__()
        self.controlnet = controlnet
        self.conditioning = conditioning

    def forward(self, sample, timestep, *inputs):
        given = dict(zip(self.conditioning + ["controlnet_cond", "conditioning_scale"], inputs))
        added = {k: given.pop(k) for k in _ADDED_CONDITIONS if k in given}
        down, mid = self.controlnet(sample, timestep, added_cond_kwargs=added or None, return_dict=False, **given)
        return (*down, mid)


# DeepCache (Ma et al. 2023): the UNet's deep features change little from one step to the next, so the steps between
# two full ones reuse the deep feature the last full step saw entering the last up block's layers at the chosen
# branch, and run only the shallow network around it. Branch b (0 = the shallowest): the first b layers of
# down_blocks[0] and the last b + 1 layers of up_blocks[-1]; those take their skips from conv_in and the first b
# down layers, which the shallow network computes afresh. The blocks supported are those whose forward is below.
_DEEPCACHE_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_DEEPCACHE_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


def deepcache_branches(unet) -> int:
    """How many DeepCache branches `unet` has (branches 0 to this less one): one per layer of its last up block.
    Raises DiffshipError for a UNet whose outer blocks are of other kinds."""
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if type(first).__name__ not in _DEEPCACHE_DOWN_BLOCKS or type(last).__name__ not in _DEEPCACHE_UP_BLOCKS:
        raise DiffshipError(f"--deepcache supports UNets whose outer blocks are {'/'.join(_DEEPCACHE_DOWN_BLOCKS)} "
                            f"and {'/'.join(_DEEPCACHE_UP_BLOCKS)}; this one has {type(first).__name__} and "
                            f"{type(last).__name__}")
    # The last up block takes conv_in's output and each of the first down block's layers as skips.
    if len(last.resnets) != len(first.resnets) + 1:
        raise DiffshipError(f"--deepcache: the UNet's last up block has {len(last.resnets)} layers for "
                            f"{len(first.resnets)} in its first down block; DeepCache needs one more")
    return len(last.resnets)


def deep_feature_channels(unet, branch: int) -> int:
    """Channels of the deep feature at `branch`: the input of up_blocks[-1].resnets[-1 - branch] less its skip."""
    resnet = unet.up_blocks[-1].resnets[-1 - branch]
    skip = unet.conv_in.out_channels if branch == 0 else unet.down_blocks[0].resnets[branch - 1].out_channels
    return resnet.in_channels - skip


def _cross_attention(attention, hidden_states, encoder_hidden_states):
    # As diffusers' CrossAttn*Block2D call their attentions in UNet2DConditionModel.forward (no masks, no kwargs).
    return attention(hidden_states, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                     attention_mask=None, encoder_attention_mask=None, return_dict=False)[0]


class _UNetWithDeepFeatures(_UNet):
    """The whole UNet, which also outputs the deep feature at `branch` (what DeepCache's cached steps reuse):
    out_sample stays output 0, so that Optimum's pipelines still read it."""

    def __init__(self, unet, conditioning: list[str], branch: int):
        super().__init__(unet, conditioning)
        self.branch = branch
        self.deep_channels = deep_feature_channels(unet, branch)

    def forward(self, sample, timestep, *conditioning):
        entering = []
        # The layer's input is the deep feature concatenated with its skip: the deep feature is its first channels.
        layer = self.unet.up_blocks[-1].resnets[-1 - self.branch]
        hook = layer.register_forward_pre_hook(lambda module, args: entering.append(args[0]))
        try:
            out_sample = super().forward(sample, timestep, *conditioning)
        finally:
            hook.remove()
        return out_sample, entering[0][:, : self.deep_channels]


class _UNetShallow(torch.nn.Module):
    """DeepCache's cached step: UNet2DConditionModel.forward line for line, with the deep feature given in place
    of everything between the first `branch` layers of down_blocks[0] and the last `branch` + 1 of up_blocks[-1].
    Inputs: the UNet's, then deep_features."""

    def __init__(self, unet, conditioning: list[str], branch: int):
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning
        self.branch = branch

    def forward(self, sample, timestep, *inputs):
        given = dict(zip(self.conditioning + [DEEP_FEATURES], inputs))
        hidden_states = given.pop(DEEP_FEATURES)
        added = {k: given.pop(k) for k in _ADDED_CONDITIONS if k in given} or None
        encoder_hidden_states, timestep_cond = given.get("encoder_hidden_states"), given.get("timestep_cond")
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # The time embedding, with the added conditions (SDXL's text_embeds and time_ids, class embeddings).
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                                   added_cond_kwargs=added)
        # The skips the shallow layers take: conv_in's output and the first down block's first `branch` layers.
        sample = unet.conv_in(sample)
        skips = [sample]
        first = unet.down_blocks[0]
        for i in range(self.branch):
            sample = first.resnets[i](sample, emb)
            if getattr(first, "attentions", None):
                sample = _cross_attention(first.attentions[i], sample, encoder_hidden_states)
            skips.append(sample)
        # The last up block's last `branch` + 1 layers, from the cached deep feature.
        last = unet.up_blocks[-1]
        for j in range(len(last.resnets) - 1 - self.branch, len(last.resnets)):
            hidden_states = last.resnets[j](torch.cat([hidden_states, skips.pop()], dim=1), emb)
            if getattr(last, "attentions", None):
                hidden_states = _cross_attention(last.attentions[j], hidden_states, encoder_hidden_states)
        for upsampler in last.upsamplers or []:
            hidden_states = upsampler(hidden_states)
        if unet.conv_norm_out:
            hidden_states = unet.conv_act(unet.conv_norm_out(hidden_states))
        return unet.conv_out(hidden_states)


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


def text_encoder_spec(name: str, text_encoder, shapes: ExportShapes, atol: float = 1e-3,
                      write_extra=None) -> ComponentSpec:
    """A CLIP text encoder: input_ids -> last_hidden_state and its pooled output (pooler_output; or, first,
    text_embeds where the model projects it), then every hidden state (hidden_states.0 is the embeddings)."""
    n_hidden = text_encoder.config.num_hidden_layers + 1
    batch = shapes.batch_size
    hidden = [f"hidden_states.{i}" for i in range(n_hidden)]
    if hasattr(text_encoder, "text_projection"):
        pooled, outputs = "text_embeds", ["text_embeds", "last_hidden_state"] + hidden
    else:
        pooled, outputs = "pooler_output", ["last_hidden_state", "pooler_output"] + hidden
    return ComponentSpec(
        name=name,
        module=_TextEncoder(text_encoder),
        example_inputs={"input_ids": torch.randint(0, text_encoder.config.vocab_size, (batch, shapes.sequence_length))},
        output_names=outputs,
        dynamic_axes={
            output: _maybe(shapes.static, {0: "batch_size", 1: "sequence_length"} if output != pooled else {0: "batch_size"})
            for output in ["input_ids"] + outputs
        },
        config_source=text_encoder.config,
        atol=atol,
        write_extra=write_extra,
        other_shapes=[] if shapes.static else [{"input_ids": (batch + 1, shapes.sequence_length)}],
    )


def unet_spec(unet, shapes: ExportShapes, vae_scale_factor: int, conditioning: dict[str, tuple[int, ...]],
              guided: bool = True, atol: float = 1e-3, deepcache_branch: int | None = None) -> ComponentSpec:
    """The denoising UNet: sample and timestep, then `conditioning`: input name -> its shape after the batch axis
    (encoder_hidden_states (sequence, features), timestep_cond, text_embeds, time_ids). `guided`: traced at the
    doubled batch of classifier-free guidance (and checked at the single one as well). `deepcache_branch`: also
    output the deep feature DeepCache caches at that branch (see unet_shallow_spec)."""
    batch = 2 * shapes.batch_size if guided else shapes.batch_size
    requested, not_multiple = latent_sizes(unet, shapes, vae_scale_factor)
    h, w = requested if shapes.static else not_multiple
    c = unet.config.in_channels
    sample_axes = {0: "batch_size", 2: "height", 3: "width"}
    condition_axes = {name: {0: "batch_size", 1: "sequence_length"} if name == "encoder_hidden_states"
                      else {0: "batch_size"} for name in conditioning}
    # Besides the traced shapes, dynamic graphs are checked at the unguided batch (one image, guidance off), at
    # the requested latent and at one the up factor does not divide, whatever size the trace was made at.
    single = {name: (shapes.batch_size, *shape) for name, shape in conditioning.items()}
    deepcache = deepcache_branch is not None
    return ComponentSpec(
        name=UNET,
        module=(_UNetWithDeepFeatures(unet, list(conditioning), deepcache_branch) if deepcache
                else _UNet(unet, list(conditioning))),
        example_inputs={
            "sample": torch.randn(batch, c, h, w),
            # Rank-0 float, as Optimum's ONNX exports take it: fractional timesteps (Karras sigmas) stay exact.
            "timestep": torch.tensor(981.0),
            **{name: torch.randn(batch, *shape) for name, shape in conditioning.items()},
        },
        output_names=["out_sample", DEEP_FEATURES] if deepcache else ["out_sample"],
        dynamic_axes={
            "sample": _maybe(shapes.static, sample_axes),
            **{name: _maybe(shapes.static, axes) for name, axes in condition_axes.items()},
            "out_sample": _maybe(shapes.static, sample_axes),
            **({DEEP_FEATURES: _maybe(shapes.static, sample_axes)} if deepcache else {}),
        },
        config_source=unet.config,
        atol=atol,
        other_shapes=[] if shapes.static else [{"sample": (shapes.batch_size, c, *size), **single}
                                               for size in dict.fromkeys((requested, not_multiple))],
    )


def _residual_shapes(unet, sample_shape) -> dict[str, tuple[int, ...]]:
    from diffship.pipelines.controlnet import residual_shapes

    shapes = residual_shapes(unet.config, sample_shape[0], *sample_shape[2:])
    names = [DOWN_BLOCK_ADDITIONAL_RESIDUAL.format(i) for i in range(len(shapes) - 1)]
    names.append(MID_BLOCK_ADDITIONAL_RESIDUAL)
    return dict(zip(names, shapes))


def with_controlnet_residuals(unet, spec: ComponentSpec) -> ComponentSpec:
    """`spec` (unet_spec's) taking, after its inputs, the residuals a ControlNet of its family outputs: one per skip
    of the down path and the mid block's, each dynamic in batch and size, validated at every shape the UNet is."""
    traced = _residual_shapes(unet, spec.example_inputs["sample"].shape)
    sample_axes = spec.dynamic_axes["sample"]
    axes = {name: ({0: "batch_size", 2: f"{name}_height", 3: f"{name}_width"} if sample_axes else {})
            for name in traced}
    spec.module = _UNet(unet, [*spec.module.conditioning, *traced])
    spec.example_inputs = {**spec.example_inputs, **{name: torch.randn(shape) for name, shape in traced.items()}}
    spec.dynamic_axes = {**spec.dynamic_axes, **axes}
    spec.other_shapes = [{**other, **_residual_shapes(unet, other["sample"])} for other in spec.other_shapes]
    return spec


def controlnet_spec(name: str, controlnet, unet_spec: ComponentSpec, vae_scale_factor: int,
                    atol: float = 1e-3) -> ComponentSpec:
    """A ControlNet beside its UNet's spec (unet_spec's, before with_controlnet_residuals): the UNet's sample (in
    the ControlNet's own channels: 4 for an inpainting UNet's 9), timestep and conditioning inputs, the control
    image at the latent's size times the VAE's factor, and the scale; traced, dynamic and validated at the UNet's
    shapes. Outputs are named after diffusers' (down_block_res_samples.N, mid_block_res_sample)."""
    conditioning = list(unet_spec.module.conditioning)
    conditioning = [c for c in conditioning if c in ("encoder_hidden_states", *_ADDED_CONDITIONS)]
    channels = controlnet.config.in_channels
    image_channels = controlnet.config.conditioning_channels

    def inputs_at(sample_shape):
        batch, _, h, w = sample_shape
        return {"sample": (batch, channels, h, w),
                "controlnet_cond": (batch, image_channels, h * vae_scale_factor, w * vae_scale_factor)}

    traced = inputs_at(unet_spec.example_inputs["sample"].shape)
    example = {"sample": torch.randn(traced["sample"]), "timestep": unet_spec.example_inputs["timestep"],
               **{c: unet_spec.example_inputs[c] for c in conditioning},
               "controlnet_cond": torch.rand(traced["controlnet_cond"]),
               "conditioning_scale": torch.tensor(1.0)}
    residuals = _residual_shapes(controlnet, traced["sample"])
    outputs = [DOWN_BLOCK_RES_SAMPLE.format(i) for i in range(len(residuals) - 1)] + [MID_BLOCK_RES_SAMPLE]
    static = not unet_spec.dynamic_axes["sample"]
    output_axes = {name: {} if static else {0: "batch_size", 2: f"{name}_height", 3: f"{name}_width"}
                   for name in outputs}
    return ComponentSpec(
        name=name,
        module=_ControlNet(controlnet, conditioning),
        example_inputs=example,
        output_names=outputs,
        dynamic_axes={"sample": unet_spec.dynamic_axes["sample"],
                      **{c: unet_spec.dynamic_axes[c] for c in conditioning},
                      "controlnet_cond": {} if static else {0: "batch_size", 2: "image_height", 3: "image_width"},
                      **output_axes},
        config_source=controlnet.config,
        atol=atol,
        other_shapes=[{**{c: other[c] for c in conditioning if c in other}, **inputs_at(other["sample"])}
                      for other in unet_spec.other_shapes],
    )


def unet_shallow_spec(unet, unet_spec: ComponentSpec, branch: int) -> ComponentSpec:
    """DeepCache's shallow UNet at `branch`, beside `unet_spec` (the UNet's, exported with the same branch): the
    UNet's inputs plus the deep feature its graph outputs, traced, checked and dynamic at the same shapes (the deep
    feature has the latent's batch and size). Same weights, a few layers of them."""
    channels = deep_feature_channels(unet, branch)
    sample = unet_spec.example_inputs["sample"]

    def deep(sample_shape):
        return (sample_shape[0], channels, *sample_shape[2:])

    axes = unet_spec.dynamic_axes
    return ComponentSpec(
        name=UNET_SHALLOW,
        module=_UNetShallow(unet, list(unet_spec.example_inputs)[2:], branch),
        example_inputs={**unet_spec.example_inputs, DEEP_FEATURES: torch.randn(deep(sample.shape))},
        output_names=["out_sample"],
        dynamic_axes={**{name: axes[name] for name in unet_spec.example_inputs if name in axes},
                      DEEP_FEATURES: axes["sample"],
                      "out_sample": axes["out_sample"]},
        config_source={**dict(unet.config), "deepcache_branch": branch},
        atol=unet_spec.atol,
        other_shapes=[{**other, DEEP_FEATURES: deep(other["sample"])} for other in unet_spec.other_shapes],
    )


class _T5Encoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=True).last_hidden_state


def t5_encoder_spec(name: str, text_encoder, shapes: ExportShapes, sequence_lengths: tuple[int, int],
                    atol: float = 1e-3) -> ComponentSpec:
    """A T5 encoder: input_ids -> last_hidden_state (Optimum's t5-encoder contract). Traced at the first of
    `sequence_lengths` and, dynamic, checked at the second with another batch: T5's relative position buckets
    are computed from the sequence length, which a trace must not bake in."""
    batch = shapes.batch_size
    traced, other = sequence_lengths
    return ComponentSpec(
        name=name,
        module=_T5Encoder(text_encoder),
        example_inputs={"input_ids": torch.randint(0, text_encoder.config.vocab_size, (batch, traced))},
        output_names=["last_hidden_state"],
        dynamic_axes={name: _maybe(shapes.static, {0: "batch_size", 1: "sequence_length"})
                      for name in ("input_ids", "last_hidden_state")},
        config_source=text_encoder.config,
        atol=atol,
        other_shapes=[] if shapes.static else [{"input_ids": (batch + 1, other)}],
    )


class _SD3Transformer(torch.nn.Module):
    """hidden_states, encoder_hidden_states, pooled_projections, timestep -> out_hidden_states (Optimum's names)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class _SkippableBlock(torch.nn.Module):
    """A joint block whose outputs are its inputs where `owner.skip_layers[index]` is True: diffusers' skip_layers
    as a graph input rather than a Python list, so one graph runs every choice of layers. Both branches are
    computed and one is selected (Where), so the kept path is bit for bit the block's."""

    def __init__(self, block, index: int, owner):
        super().__init__()
        self.block, self.index, self.owner = block, index, [owner]  # a list: not a submodule (no cycle)

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        encoder_out, hidden_out = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                             temb=temb, joint_attention_kwargs=joint_attention_kwargs)
        skip = self.owner[0].skip_layers[self.index]
        hidden_out = torch.where(skip, hidden_states, hidden_out)
        if encoder_out is not None:  # the last block of SD3 (context_pre_only) returns no text tokens
            encoder_out = torch.where(skip, encoder_hidden_states, encoder_out)
        return encoder_out, hidden_out


class _SD3TransformerSkippingLayers(_SD3Transformer):
    """The transformer with a fifth input, skip_layers (bool [num_layers]), for skip-layer guidance: its joint
    blocks are swapped for _SkippableBlock while the wrapper runs (the pipeline's own module is left as it was)."""

    def __init__(self, transformer):
        super().__init__(transformer)
        self.skippable = torch.nn.ModuleList(
            _SkippableBlock(block, i, self) for i, block in enumerate(transformer.transformer_blocks))
        self.skip_layers = None

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers):
        blocks, self.skip_layers = self.transformer.transformer_blocks, skip_layers
        self.transformer.transformer_blocks = self.skippable
        try:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        finally:
            self.transformer.transformer_blocks, self.skip_layers = blocks, None


def sd3_transformer_spec(transformer, shapes: ExportShapes, vae_scale_factor: int, sequence_lengths: tuple[int, int],
                         atol: float = 1e-3, skip_layers: bool = False) -> ComponentSpec:
    """SD3's MMDiT: the latent as hidden_states [B, C, h, w] (h, w multiples of the patch size), the text tokens
    (encoder_hidden_states [B, S, joint_attention_dim]: CLIP's then T5's), the pooled CLIP embeddings and a float
    timestep per batch item ([B], as diffusers and Optimum feed it). Traced at the guided batch and the requested
    latent; dynamic graphs are also checked unguided, at a non-square latent whose patch grid differs from the
    traced one on both axes (the position embedding is cropped from the shape) and at the other text length.
    `skip_layers`: the graph also takes SKIP_LAYERS (skip-layer guidance; validated with random layers skipped)."""
    config = transformer.config
    batch = 2 * shapes.batch_size
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    patch = config.patch_size
    traced, other = sequence_lengths
    sample_axes = {0: "batch_size", 2: "height", 3: "width"}
    other_latent = (h + patch, w + 2 * patch)
    single = shapes.batch_size
    example_inputs = {
        "hidden_states": torch.randn(batch, config.in_channels, h, w),
        "encoder_hidden_states": torch.randn(batch, traced, config.joint_attention_dim),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim),
        "timestep": torch.full((batch,), 981.0),
    }
    if skip_layers:
        example_inputs[SKIP_LAYERS] = torch.zeros(len(transformer.transformer_blocks), dtype=torch.bool)
    return ComponentSpec(
        name=TRANSFORMER,
        module=(_SD3TransformerSkippingLayers if skip_layers else _SD3Transformer)(transformer),
        example_inputs=example_inputs,
        output_names=["out_hidden_states"],
        dynamic_axes={
            "hidden_states": _maybe(shapes.static, sample_axes),
            "encoder_hidden_states": _maybe(shapes.static, {0: "batch_size", 1: "sequence_length"}),
            "pooled_projections": _maybe(shapes.static, {0: "batch_size"}),
            "timestep": _maybe(shapes.static, {0: "batch_size"}),
            "out_hidden_states": _maybe(shapes.static, sample_axes),
        },
        config_source=config,
        atol=atol,
        other_shapes=[] if shapes.static else [{
            "hidden_states": (single, config.in_channels, *other_latent),
            "encoder_hidden_states": (single, other, config.joint_attention_dim),
            "pooled_projections": (single, config.pooled_projection_dim),
            "timestep": (single,),
        }],
    )


def _traceable_apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb (the real form Flux uses), with the pairs taken by strided slices: its
    x.reshape(*x.shape[:-1], -1, 2) is traced with the traced batch and length as constants. Same values, bit for
    bit (the rotation of each (even, odd) pair)."""
    cos, sin = freqs_cis
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if sequence_dim == 1 else (cos[None, None],
                                                                                           sin[None, None])
    x_real, x_imag = x[..., 0::2], x[..., 1::2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _rms_norm_symbolic(opset: int):
    """aten::rms_norm (torch.nn.RMSNorm, Flux's query and key norms) for the TorchScript exporter, which has none
    below opset 23's RMSNormalization: x / sqrt(mean(x^2) + eps) * weight over the normalized axes, in fp32."""
    from torch.onnx import symbolic_helper

    def rms_norm(g, x, normalized_shape, weight, eps):
        axes = list(range(-len(symbolic_helper._maybe_get_const(normalized_shape, "is")), 0))
        eps = None if symbolic_helper._is_none(eps) else symbolic_helper._maybe_get_const(eps, "f")
        eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
        square = g.op("Mul", x, x)
        if opset >= 18:  # ReduceMean takes its axes as an input from opset 18
            mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
        else:
            mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
        eps = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps)))
        return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)

    return rms_norm


def _register_rms_norm() -> None:
    for opset in (14, 18):  # each registration serves its opset and those above it, up to the next
        torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic(opset), opset)


class _FluxTransformer(torch.nn.Module):
    """hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids (+ guidance) ->
    out_hidden_states: Optimum's names and order. Runs diffusers' model with the traceable rotary embedding."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        from diffusers.models.transformers import transformer_flux

        original = transformer_flux.apply_rotary_emb
        transformer_flux.apply_rotary_emb = _traceable_apply_rotary_emb
        try:
            return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                    txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        finally:
            transformer_flux.apply_rotary_emb = original


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """diffusers' _prepare_latent_image_ids: (0, row, column) of each packed patch, row by row [h * w, 3]."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_transformer_spec(transformer, shapes: ExportShapes, vae_scale_factor: int,
                          sequence_lengths: tuple[int, int], atol: float = 1e-3) -> ComponentSpec:
    """Flux's transformer: the latent as packed 2x2 patches (hidden_states [B, h/2 * w/2, in_channels]), T5's
    tokens (encoder_hidden_states [B, S, joint_attention_dim]), CLIP's pooled embedding, the timestep divided by
    1000 (float [B], as diffusers' pipelines feed it), the image and text position ids ([h/2 * w/2, 3], [S, 3],
    float: diffusers' dtype and OpenVINO GenAI's; Optimum's ONNX export takes int64) and, for guidance-distilled
    models (guidance_embeds: dev, Fill), the guidance scale [B]. Traced at twice the batch (dynamic graphs) and the
    requested latent; dynamic graphs are also checked at the batch, at a non-square patch grid that differs from
    the traced one on both axes, and at the other text length."""
    _register_rms_norm()
    config = transformer.config
    # Two images (true CFG's batch) so that no batch of one is traced in; a static graph runs the images alone.
    single = shapes.batch_size
    batch = single if shapes.static else 2 * single
    h, w = shapes.height // vae_scale_factor // 2, shapes.width // vae_scale_factor // 2
    traced, other = sequence_lengths

    def inputs_at(images: int, grid: tuple[int, int], text: int) -> dict[str, torch.Tensor]:
        inputs = {
            "hidden_states": torch.randn(images, grid[0] * grid[1], config.in_channels),
            "encoder_hidden_states": torch.randn(images, text, config.joint_attention_dim),
            "pooled_projections": torch.randn(images, config.pooled_projection_dim),
            "timestep": torch.full((images,), 0.981),
            "img_ids": flux_image_ids(*grid),
            "txt_ids": torch.zeros(text, 3),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((images,), 3.5)
        return inputs

    example = inputs_at(batch, (h, w), traced)
    axes = {"hidden_states": {0: "batch_size", 1: "packed_height_width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "pooled_projections": {0: "batch_size"}, "timestep": {0: "batch_size"},
            "img_ids": {0: "packed_height_width"}, "txt_ids": {0: "sequence_length"},
            "guidance": {0: "batch_size"}, "out_hidden_states": {0: "batch_size", 1: "packed_height_width"}}
    other_inputs = inputs_at(single, (h + 1, w + 2), other)
    return ComponentSpec(
        name=TRANSFORMER,
        module=_FluxTransformer(transformer),
        example_inputs=example,
        output_names=["out_hidden_states"],
        dynamic_axes={name: _maybe(shapes.static, axes[name]) for name in [*example, "out_hidden_states"]},
        config_source=config,
        atol=atol,
        other_shapes=[] if shapes.static else [{name: tuple(t.shape) for name, t in other_inputs.items()}],
    )


def vae_encoder_spec(vae, shapes: ExportShapes, vae_scale_factor: int, atol: float = 1e-3) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    c = vae.config.in_channels
    return ComponentSpec(
        name=VAE_ENCODER,
        module=_VaeEncoder(vae),
        example_inputs={"sample": torch.rand(shapes.batch_size, c, shapes.height, shapes.width) * 2 - 1},
        output_names=["latent_parameters"],
        dynamic_axes={"sample": _maybe(shapes.static, axes), "latent_parameters": _maybe(shapes.static, axes)},
        config_source=vae.config,
        atol=atol,
        other_shapes=[] if shapes.static else [
            {"sample": (shapes.batch_size + 1, c, *_other_image_size(shapes, vae_scale_factor))}],
    )


def vae_decoder_spec(vae, shapes: ExportShapes, vae_scale_factor: int, atol: float = 1e-3) -> ComponentSpec:
    axes = {0: "batch_size", 2: "height", 3: "width"}
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    c = vae.config.latent_channels
    other_h, other_w = (size // vae_scale_factor for size in _other_image_size(shapes, vae_scale_factor))
    return ComponentSpec(
        name=VAE_DECODER,
        module=_VaeDecoder(vae),
        example_inputs={"latent_sample": torch.randn(shapes.batch_size, c, h, w)},
        output_names=["sample"],
        dynamic_axes={"latent_sample": _maybe(shapes.static, axes), "sample": _maybe(shapes.static, axes)},
        config_source=vae.config,
        atol=atol,
        other_shapes=[] if shapes.static else [{"latent_sample": (shapes.batch_size + 1, c, other_h, other_w)}],
    )


def _other_image_size(shapes: ExportShapes, vae_scale_factor: int) -> tuple[int, int]:
    """An image size other than the traced one for the VAE's validation: one latent row and two columns more."""
    return shapes.height + vae_scale_factor, shapes.width + 2 * vae_scale_factor


def depth_estimator_spec(depth_estimator, shapes: ExportShapes, atol: float = 1e-3) -> ComponentSpec:
    """DPTForDepthEstimation: pixel_values [B,3,S,S] -> predicted_depth [B,h,w]. Height and width stay fixed at the
    DPT's image_size (the size its feature extractor resizes every image to): ViT position embeddings are resized
    with Python ints at trace time, so a graph traced at one size would be wrong at another."""
    size = depth_estimator.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ComponentSpec(
        name=DEPTH_ESTIMATOR,
        module=_DepthEstimator(depth_estimator),
        example_inputs={"pixel_values": torch.randn(shapes.batch_size, depth_estimator.config.num_channels, *size)},
        output_names=["predicted_depth"],
        dynamic_axes={"pixel_values": _maybe(shapes.static, {0: "batch_size"}),
                      "predicted_depth": _maybe(shapes.static, {0: "batch_size"})},
        config_source=depth_estimator.config,
        atol=atol,
        other_shapes=[] if shapes.static else [
            {"pixel_values": (shapes.batch_size + 1, depth_estimator.config.num_channels, *size)}],
    )


def final_layer_norm_writer(text_encoder):
    """write_extra for a CLIP text encoder whose family applies clip_skip with the final layer norm (SD 1.x/2.x):
    the numpy pipeline needs its weights, and they are too small to be worth a graph of their own."""
    import numpy as np

    from diffship.layout import FINAL_LAYER_NORM_FILE

    # Read now, and copied: the writer runs after the component is exported, and a reference to the module (or to
    # a view of its weights) would keep the whole text encoder in memory until the export ends (transformers 4
    # nests the norm under text_model, transformers 5 does not).
    norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
    values = {"weight": norm.weight.detach().float().numpy().copy(), "bias": norm.bias.detach().float().numpy().copy(),
              "eps": np.float64(norm.eps)}

    def write(folder: Path) -> None:
        np.savez(folder / FINAL_LAYER_NORM_FILE, **values)

    return write
