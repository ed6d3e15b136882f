"""Tiny deterministic diffusers-format Stable Diffusion pipelines, built from configs with fixed seeds.

They stand in for hub checkpoints in tests, the demo and benchmarks: the same architectures and code paths as
the real models, small enough to export and run in seconds. `sd1` mirrors Stable Diffusion 1.x (epsilon
prediction, an int attention_head_dim, the OpenAI CLIP tokenizer's pad token); `sd2` mirrors 2.x
(v_prediction, linear projections, per-block head dims, upcast attention, "!" padding). Both have the 8x VAE of
every Stable Diffusion and draw 64x64 images from 8x8 latents; `sd1`'s UNet has three levels (up factor 4), `sd2`'s
four, as Stable Diffusion's (up factor 8), so that sizes whose latent the up factor does not divide (40x64, 72x48)
are exercised. `full-size` has the SD1.5 architecture with random weights, for speed measurements (latency does
not depend on weight values).

Two task kinds: `sd1-inpaint` is `sd1` with a 9-channel inpainting UNet (latents + mask + masked-image latents), as
in stable-diffusion-inpainting; `sd2-depth` is `sd2` with a 5-channel UNet (latents + depth) and a tiny DPT depth
estimator with its DPTImageProcessor, as in stable-diffusion-2-depth.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffship.testing.vocabulary import BOS_TOKEN, EOS_TOKEN, build_clip_vocabulary

KINDS = ("sd1", "sd2", "sd1-inpaint", "sd2-depth", "sd1-lcm", "sd-turbo", "sdxl", "sdxl-refiner", "sdxl-inpaint",
         "sdxl-lcm", "sdxl-turbo", "sd3", "sd3.5", "sd3-inpaint", "flux", "flux-schnell", "flux-fill", "full-size",
         "full-size-sdxl", "full-size-sd3")

_SCHEDULER_SD1 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_SCHEDULER_SD2 = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
}

# SDXL ships Euler with "leading" spacing; LCM its own scheduler; the Turbo models Euler ancestral with "trailing"
# spacing, so that one step starts from pure noise (t = 999).
_SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}
_SCHEDULER_LCM = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_SCHEDULER_TURBO = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}

# Four levels, so the 8x scale factor of every Stable Diffusion VAE: a 64x64 image has an 8x8 latent.
_VAE_8X = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, sample_size=64)

_SPECS = {
    "sd1": {
        # Three levels (up factor 4) under an 8x VAE, as the issue of non-divisible sizes needs: at 40x64 or
        # 72x48 the latent (5x8, 9x6) is not a multiple of 4, so the UNet must forward its skip sizes to the
        # upsamplers, as Stable Diffusion does at e.g. 520x520.
        "unet": dict(
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": _VAE_8X,
        "text_encoder": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                             hidden_act="quick_gelu", projection_dim=32),
        "pad_token": EOS_TOKEN,
        "scheduler": _SCHEDULER_SD1,
    },
    "sd2": {
        # Stable Diffusion's own layout in small: four levels (up factor 8, three cross-attention levels over a
        # plain one) under an 8x VAE.
        "unet": dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            # 16 groups, not 32: at 64x64 the deepest level is 1x1, and a GroupNorm over 2 values is so badly
            # conditioned that float32 PyTorch itself is 1e-3 off float64 there; 4 channels a group keep it at 1e-6.
            norm_num_groups=16,
        ),
        "vae": _VAE_8X,
        "text_encoder": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                             hidden_act="gelu", projection_dim=32),
        "pad_token": "!",
        "scheduler": _SCHEDULER_SD2,
    },
    "full-size": {
        # Stable Diffusion 1.5: diffusers' UNet2DConditionModel defaults are the SD1 UNet.
        "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        ),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             hidden_act="quick_gelu", projection_dim=768, vocab_size=49408),
        "pad_token": EOS_TOKEN,
        "scheduler": _SCHEDULER_SD1,
    },
}
# SDXL in small: a three-level UNet (up factor 4, as SDXL's) with the "text_time" additional embedding (the pooled
# text embedding of text_encoder_2 and six size/crop numbers, each embedded in addition_time_embed_dim), two
# transformer layers in its deepest block as SDXL has, cross-attention over both encoders' hidden states
# concatenated (32 + 32); text_encoder_2 is a CLIPTextModelWithProjection whose tokenizer pads with "!".
_SDXL_UNET = dict(
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
    norm_num_groups=16,
)
_CLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                  hidden_act="gelu", projection_dim=32)
_SPECS["sdxl"] = {
    "unet": _SDXL_UNET,
    "vae": _VAE_8X,
    "text_encoder": _CLIP_TINY,
    "text_encoder_2": _CLIP_TINY,
    "pad_token": EOS_TOKEN,
    "pad_token_2": "!",
    "scheduler": _SCHEDULER_SDXL,
    "pipeline": "StableDiffusionXLPipeline",
}
# The refiner: text_encoder_2 only (cross-attention over its 32 features), and the aesthetic score in place of the
# target size among the additional numbers (5 of them).
_SPECS["sdxl-refiner"] = {
    **_SPECS["sdxl"],
    "unet": {**_SDXL_UNET, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 5 * 8 + 32},
    "text_encoder": None,
    "pipeline": "StableDiffusionXLImg2ImgPipeline",
    "pipeline_config": {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False},
}
_SPECS["sdxl-inpaint"] = {**_SPECS["sdxl"], "unet": {**_SDXL_UNET, "in_channels": 9},
                          "pipeline": "StableDiffusionXLInpaintPipeline"}
# LCM: the UNet takes the guidance scale's embedding as timestep_cond (time_cond_proj_dim), and runs no
# unconditional batch.
_SPECS["sdxl-lcm"] = {**_SPECS["sdxl"], "unet": {**_SDXL_UNET, "time_cond_proj_dim": 16},
                      "scheduler": _SCHEDULER_LCM}
_SPECS["sdxl-turbo"] = {**_SPECS["sdxl"], "scheduler": _SCHEDULER_TURBO,
                        "pipeline_config": {"force_zeros_for_empty_prompt": True}}
_SPECS["sd1-lcm"] = {**_SPECS["sd1"], "unet": {**_SPECS["sd1"]["unet"], "time_cond_proj_dim": 16},
                     "scheduler": _SCHEDULER_LCM, "pipeline": "LatentConsistencyModelPipeline"}
# SD-Turbo is SD 2.1 distilled: sd2's architecture with the Turbo scheduler.
_SPECS["sd-turbo"] = {**_SPECS["sd2"], "scheduler": _SCHEDULER_TURBO}
# SDXL 1.0's architecture with random weights, for speed measurements.
_SPECS["full-size-sdxl"] = {
    "unet": dict(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048,
    ),
    "vae": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    ),
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         hidden_act="quick_gelu", projection_dim=768, vocab_size=49408),
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           hidden_act="gelu", projection_dim=1280, vocab_size=49408),
    "pad_token": EOS_TOKEN,
    "pad_token_2": "!",
    "scheduler": _SCHEDULER_SDXL,
    "pipeline": "StableDiffusionXLPipeline",
}

# Stable Diffusion 3 in small: an MMDiT transformer (2 joint blocks, 2x2 patches over 16 latent channels) under
# the 16-channel VAE with its shift_factor; two CLIP encoders with projections (pooled 32 + 32 = the transformer's
# pooled_projection_dim) and a T5 encoder whose 80 features are wider than the CLIP pair's 64, so that the CLIP
# hidden states are zero-padded to T5's width as in SD3 (768 + 1280 < 4096). Flow matching, shift 3.0. Images
# are multiples of 16 (VAE 8 x patch 2): 64x64 by default (an 8x8 latent, 4x4 patches).
_SPECS["sd3"] = {
    "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=80,
                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16),
    "vae": {**_VAE_8X, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "text_encoder": _CLIP_TINY,
    "text_encoder_2": _CLIP_TINY,
    "text_encoder_3": dict(d_model=80, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                           relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                           is_encoder_decoder=False, use_cache=False),
    "pad_token": EOS_TOKEN,
    "pad_token_2": "!",
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "pipeline": "StableDiffusion3Pipeline",
}
# SD 3.5 in small: RMS-normalised queries and keys (qk_norm) and, as 3.5 Medium's MMDiT-X, a second self-attention
# over the image tokens in its first block (dual_attention_layers).
_SPECS["sd3.5"] = {**_SPECS["sd3"], "transformer": {**_SPECS["sd3"]["transformer"], "qk_norm": "rms_norm",
                                                     "dual_attention_layers": (0,)}}
# A dedicated SD3 inpainting transformer: latents + mask + masked-image latents (16 + 1 + 16 = 33 channels in, 16 out).
_SPECS["sd3-inpaint"] = {**_SPECS["sd3"], "transformer": {**_SPECS["sd3"]["transformer"], "in_channels": 33},
                         "pipeline": "StableDiffusion3InpaintPipeline"}

# Flux.1 in small: a FluxTransformer2DModel (one double-stream and one single-stream block, 2 heads of 16 features
# whose rotary embedding splits 4 + 6 + 6 over the id axes) over packed 2x2 patches of 16 latent channels (64 in),
# the 16-channel VAE with Flux's scaling and shift factors, CLIP-L's pooled output (CLIPTextModel, 32 features = the
# pooled_projection_dim) and T5's hidden states (text_encoder_2, 80 features = joint_attention_dim). `flux` is
# FLUX.1-dev's layout (guidance_embeds: the guidance scale is an input; its scheduler shifts dynamically with the
# image's patch count), `flux-schnell` FLUX.1-schnell's (no guidance input; shift 1, not dynamic), `flux-fill`
# FLUX.1-Fill-dev's (latents + masked-image latents + the 8x8 pixel mask packed: 64 + 64 + 256 = 384 channels in).
# Images are multiples of 16 (VAE 8 x packing 2); 64x64 is a 4x4 grid of patches.
_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=80, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
_SCHEDULER_FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                       "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096}
_SPECS["flux"] = {
    "transformer": _FLUX_TRANSFORMER,
    "vae": {**_VAE_8X, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "text_encoder": _CLIP_TINY,
    "text_encoder_2": _SPECS["sd3"]["text_encoder_3"],
    "pad_token": EOS_TOKEN,
    "scheduler": _SCHEDULER_FLUX_DEV,
    "pipeline": "FluxPipeline",
}
_SPECS["flux-schnell"] = {**_SPECS["flux"], "transformer": {**_FLUX_TRANSFORMER, "guidance_embeds": False},
                          "scheduler": {**_SCHEDULER_FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}}
_SPECS["flux-fill"] = {**_SPECS["flux"], "transformer": {**_FLUX_TRANSFORMER, "in_channels": 384,
                                                         "out_channels": 64},
                       "pipeline": "FluxFillPipeline"}

# Stable Diffusion 3 Medium's MMDiT (2.03 B parameters, 8.1 GB in fp32) and 16-channel VAE at full size, random
# weights, for benchmarks. Its text encoders keep the widths the transformer reads (CLIP-L 768 and CLIP-G 1280, whose
# pooled embeddings make its 2048 pooled_projection_dim; T5-XXL's 4096, its joint_attention_dim) but only two layers
# (T5: one, with two heads and a narrow feed-forward) and the tiny tokenizers' vocabularies: SD3's own are 123 M, 695 M
# and 4.7 B parameters, and T5-XXL alone (19 GB in fp32) exceeds a 24 GB machine's export. The transformer's latency
# and export do not depend on the encoders' depth, only on these widths and the token counts.
_SPECS["full-size-sd3"] = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, latent_channels=16,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                force_upcast=True),
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2,
                         hidden_act="quick_gelu", projection_dim=768),
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=2,
                           hidden_act="gelu", projection_dim=1280),
    "text_encoder_3": dict(d_model=4096, d_kv=64, d_ff=512, num_layers=1, num_heads=2, dropout_rate=0.0,
                           feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False),
    "pad_token": EOS_TOKEN,
    "pad_token_2": "!",
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "pipeline": "StableDiffusion3Pipeline",
}

# Task kinds: a base kind with another UNet input width, and the diffusers pipeline class that holds it.
_TASK_KINDS = {
    "sd1-inpaint": ("sd1", 9, "StableDiffusionInpaintPipeline"),
    "sd2-depth": ("sd2", 5, "StableDiffusionDepth2ImgPipeline"),
}
for _kind, (_base, _channels, _) in _TASK_KINDS.items():
    _SPECS[_kind] = {**_SPECS[_base], "unet": {**_SPECS[_base]["unet"], "in_channels": _channels}}

# A tiny non-hybrid DPT (ViT backbone): 32x32 input, 8x8 patches. initializer_range 0.1 gives depth values of a
# useful spread (transformers' 0.02 makes the ReLU head output ~1e-8 everywhere).
_DPT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=4,
            backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
            is_hybrid=False, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, head_in_index=-1,
            initializer_range=0.1)


def save_tokenizer(out_dir: str | Path, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer (vocab.json, merges.txt, tokenizer.json, configs) trained on a prompt corpus."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    vocab, merges = build_clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes only tokenizer.json; older readers (and Optimum) look for the BPE files.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def load_tokenizer(pad_token: str = EOS_TOKEN):
    """transformers' CLIPTokenizer over the vocabulary `save_tokenizer` writes."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(save_tokenizer(tmp, pad_token))


def write_pipeline(pipe, out_dir: str | Path, pad_token: str = EOS_TOKEN, pad_token_2: str | None = None) -> Path:
    """Save a diffusers pipeline as a directory (safetensors) that transformers 4 and 5 both read right."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    # T5's folders (SD3's tokenizer_3, Flux's tokenizer_2 and text_encoder_2) keep what transformers wrote.
    t5 = {name for name, entry in index.items() if isinstance(entry, list) and str(entry[-1]).startswith("T5")}
    # Replace the CLIP tokenizer folders with ours so that vocab.json/merges.txt sit beside tokenizer.json.
    for folder, pad in (("tokenizer", pad_token), ("tokenizer_2", pad_token_2)):
        if (out_dir / folder).is_dir() and folder not in t5:
            save_tokenizer(out_dir / folder, pad)
    for folder in ("text_encoder", "text_encoder_2"):
        if folder not in t5:
            _text_encoder_hub_layout(out_dir / folder / "model.safetensors")
    for folder in sorted(t5):
        if not folder.startswith("tokenizer"):
            continue
        # transformers 5 names its T5 tokenizer class T5Tokenizer (the fast one); transformers 4 (Optimum's) takes
        # that name for the sentencepiece one. SD3's and Flux's hub repos say T5TokenizerFast, which both read.
        index[folder] = ["transformers", "T5TokenizerFast"]
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        # transformers 5 writes extra_special_tokens as a list, which transformers 4 reads as a dict and fails on;
        # the tiny T5 vocabulary has none (extra_ids=0).
        config_path = out_dir / folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        if config.get("extra_special_tokens") == []:
            del config["extra_special_tokens"]
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _clip_config(settings: dict, tokenizer):
    from transformers import CLIPTextConfig

    settings = dict(settings)
    settings.setdefault("vocab_size", len(tokenizer))
    return CLIPTextConfig(**settings, max_position_embeddings=77, layer_norm_eps=1e-5,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_tiny_pipeline(kind: str = "sd1", seed: int = 0):
    """The diffusers pipeline (torch) for `kind`, with weights drawn from `seed`: StableDiffusionPipeline, or the
    class the kind names (inpainting, depth-to-image, SDXL, its refiner, LCM)."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in _SPECS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = _SPECS[kind]
    if spec.get("pipeline", "").startswith("Flux"):
        return _build_flux(spec, seed)
    if "transformer" in spec:
        return _build_sd3(spec, seed)

    # One seed per component, so that changing one component's config leaves the others' weights alone.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **_vae_blocks(spec["vae"]))
    components = dict(vae=vae.eval(), unet=unet.eval())
    if spec.get("text_encoder") is not None:
        tokenizer = load_tokenizer(spec["pad_token"])
        torch.manual_seed(seed + 2)
        components.update(tokenizer=tokenizer,
                          text_encoder=CLIPTextModel(_clip_config(spec["text_encoder"], tokenizer)).eval())
    else:
        components.update(tokenizer=None, text_encoder=None)
    if "text_encoder_2" in spec:
        tokenizer_2 = load_tokenizer(spec["pad_token_2"])
        torch.manual_seed(seed + 4)
        components.update(tokenizer_2=tokenizer_2, text_encoder_2=CLIPTextModelWithProjection(
            _clip_config(spec["text_encoder_2"], tokenizer_2)).eval())

    scheduler_config = spec["scheduler"]
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipeline_class = spec.get("pipeline") or _TASK_KINDS.get(kind, (None, None, "StableDiffusionPipeline"))[2]
    if pipeline_class == "StableDiffusionDepth2ImgPipeline":
        components.update(_tiny_depth_estimator(seed + 3))
    elif pipeline_class.startswith("StableDiffusionXL"):
        # No invisible watermark: it is not part of the model, and would make the oracle's images differ.
        components.update(add_watermarker=False, **spec.get("pipeline_config", {}))
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline_class)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_sd3(spec: dict, seed: int):
    """diffusers' StableDiffusion3Pipeline on the tiny SD3 spec: one seed per component, as for the UNet kinds."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**spec["transformer"])
    torch.manual_seed(seed + 1)
    vae_spec = dict(spec["vae"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, **_vae_blocks(vae_spec))
    components = dict(transformer=transformer.eval(), vae=vae.eval())
    for i, (suffix, pad) in enumerate((("", spec["pad_token"]), ("_2", spec["pad_token_2"]))):
        tokenizer = load_tokenizer(pad)
        torch.manual_seed(seed + 2 + 2 * i)
        components[f"tokenizer{suffix}"] = tokenizer
        components[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(
            _clip_config(spec[f"text_encoder{suffix}"], tokenizer)).eval()
    tokenizer_3 = load_t5_tokenizer()
    torch.manual_seed(seed + 6)
    components["tokenizer_3"] = tokenizer_3
    components["text_encoder_3"] = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        **spec["text_encoder_3"])).eval()
    scheduler_config = spec["scheduler"]
    components["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = getattr(diffusers, spec["pipeline"])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_flux(spec: dict, seed: int):
    """diffusers' Flux pipeline on a tiny Flux spec: one seed per component, as for the other kinds."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec["transformer"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **_vae_blocks(spec["vae"]))
    tokenizer = load_tokenizer(spec["pad_token"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(spec["text_encoder"], tokenizer))
    tokenizer_2 = load_t5_tokenizer()
    torch.manual_seed(seed + 4)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        **spec["text_encoder_2"]))
    scheduler_config = spec["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = getattr(diffusers, spec["pipeline"])(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_t5_tokenizer():
    """transformers' T5TokenizerFast over the tiny T5 vocabulary (testing/vocabulary.build_t5_tokenizer)."""
    from transformers import T5TokenizerFast

    from diffship.testing.vocabulary import T5_EOS_TOKEN, T5_PAD_TOKEN, T5_UNK_TOKEN, build_t5_tokenizer

    # extra_ids=0: no <extra_id_N> sentinels (T5's span-corruption tokens, which an encoder for prompts never
    # sees); model_max_length 512, SD3's limit for max_sequence_length.
    return T5TokenizerFast(tokenizer_object=build_t5_tokenizer(), eos_token=T5_EOS_TOKEN, unk_token=T5_UNK_TOKEN,
                           pad_token=T5_PAD_TOKEN, extra_ids=0, model_max_length=512)


def _tiny_depth_estimator(seed: int) -> dict:
    """depth_estimator (DPTForDepthEstimation) and feature_extractor (DPTImageProcessor at the DPT's input size)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    depth_estimator = DPTForDepthEstimation(DPTConfig(**_DPT)).eval()
    size = {"height": _DPT["image_size"], "width": _DPT["image_size"]}
    try:  # transformers 5 without torchvision: the PIL backend, which DPTImageProcessor falls back to anyway
        from transformers import DPTImageProcessorPil as processor_class
    except ImportError:
        from transformers import DPTImageProcessor as processor_class
    return {"depth_estimator": depth_estimator, "feature_extractor": processor_class(size=size)}


def _vae_blocks(vae_spec: dict) -> dict:
    spec = dict(vae_spec)
    n = len(spec["block_out_channels"])
    spec.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
    spec.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
    return spec


def save_tiny_pipeline(out_dir: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write the `kind` pipeline as a diffusers directory (safetensors weights) and return its path."""
    spec = _SPECS[kind]
    return write_pipeline(build_tiny_pipeline(kind, seed), out_dir, spec["pad_token"], spec.get("pad_token_2"))


def _text_encoder_hub_layout(path: Path) -> None:
    """transformers 5 saves CLIPTextModel weights without the `text_model.` prefix that hub checkpoints (and
    transformers 4, which Optimum pins) use; transformers 4 would load random weights silently. Both versions
    read the prefixed names, so write those."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    prefix = "text_model."
    if not path.is_file():
        return
    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # CLIPTextModelWithProjection's projection sits beside text_model, not in it.
    keep = ("text_projection.",)
    if all(k.startswith(prefix) or k.startswith(keep) for k in tensors):
        return
    save_file({k if k.startswith(prefix) or k.startswith(keep) else prefix + k: v for k, v in tensors.items()}, str(path), metadata=metadata)
