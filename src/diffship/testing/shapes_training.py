"""Train the shapes reference model: a small Stable-Diffusion-style pipeline that draws "a {colour} {shape} on the
{position}" at 64x64, trained from scratch on `diffship.testing.shapes` renders in well under an hour on 2 CPU cores.

    python -m diffship.testing.shapes_training OUT [--seed 0]

Two phases, each a fixed number of steps so that a rerun with the same seed and thread count repeats the run:
  1. AutoencoderKL (x4 down-sampling: 64x64x3 <-> 16x16x4) on fresh renders, L1 + MSE with SD's tiny KL weight;
     its scaling_factor is then set to 1 / std of the dataset's latents, as SD's was.
  2. UNet2DConditionModel and the CLIP text encoder together: v-prediction on SD's scaled-linear schedule rescaled
     to zero terminal SNR (Lin et al. 2023, as diffusers' `rescale_betas_zero_snr`), 10 % empty prompts (so
     classifier-free guidance works) and an EMA of the weights, which is what is saved. The scheduler config
     samples with "trailing" timesteps, so the first step starts from pure noise, as training's last one did.
Conditioning is what a short run struggles with. On SD's own schedule (epsilon, terminal SNR 0.0047) a run of
1000 steps drew the right colour and shape but put it anywhere: even the noisiest training inputs still show where
the shape is, so the model learns to read position from the noise, and at inference pure noise places it at
random. With zero terminal SNR the noisiest inputs hold nothing, and position must come from the text. The text
encoder trains with the UNet rather than staying random, and cross-attention sits at 8x8, 4x4 and in the mid block,
coarse enough to be cheap and fine enough to place a shape (attention at 16x16 would double the step time). Writes a diffusers directory plus training_log.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from diffship.testing import shapes

CONFIG = {
    "seed": 0,
    "threads": 2,
    "vae": {"steps": 900, "batch": 32, "lr": 1e-3, "kl_weight": 1e-6, "block_out_channels": (16, 32, 64),
            "norm_num_groups": 8, "layers_per_block": 1},
    "text_encoder": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2},
    "unet": {"block_out_channels": (32, 64, 128), "layers_per_block": 1, "attention_head_dim": 8,
             "norm_num_groups": 16, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
    "train": {"steps": 4000, "batch": 64, "lr": 5e-4, "warmup": 100, "weight_decay": 1e-2, "empty_prompt": 0.1,
              "ema_decay": 0.999, "renders_per_prompt": 128},
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                  "timestep_spacing": "trailing"},
}
LATENT_SIZE = shapes.SIZE // 4


def build_components(config: dict):
    """Fresh (tokenizer, text_encoder, vae, unet), weights drawn from config["seed"]."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffship.testing.tiny_models import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(config["seed"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **config["text_encoder"], vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae_spec = config["vae"]
    n = len(vae_spec["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.SIZE,
                        block_out_channels=vae_spec["block_out_channels"], norm_num_groups=vae_spec["norm_num_groups"],
                        layers_per_block=vae_spec["layers_per_block"], down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n)
    unet = UNet2DConditionModel(sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
                                cross_attention_dim=config["text_encoder"]["hidden_size"],
                                **config["unet"])
    return tokenizer, text_encoder, vae, unet


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, config: dict, rng: np.random.Generator, log: list, progress) -> None:
    import torch

    spec = config["vae"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec["lr"])
    vae.train()
    for step in progress(range(spec["steps"]), desc="vae"):
        prompts = rng.choice(shapes.PROMPTS, size=spec["batch"])
        x = _to_tensor(np.stack([shapes.render(p, rng) for p in prompts]))
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        reconstruction = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = reconstruction + spec["kl_weight"] * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == spec["steps"] - 1:
            log.append({"phase": "vae", "step": step, "reconstruction": reconstruction.item()})
    vae.eval()


def encode_dataset(vae, config: dict, rng: np.random.Generator):
    """Posterior means and stds of renders_per_prompt renders of each prompt, the prompt index of each, and the
    scaling factor (1 / std of sampled latents) set on the VAE's config."""
    import torch

    images, prompts = shapes.render_dataset(config["train"]["renders_per_prompt"], seed=int(rng.integers(2**31)))
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            dist = vae.encode(_to_tensor(images[start:start + 256])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    means, stds = torch.cat(means), torch.cat(stds)
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(config["seed"]))
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    prompt_index = torch.tensor([shapes.PROMPTS.index(p) for p in prompts])
    return means, stds, prompt_index, scaling_factor


def train_unet(unet, text_encoder, tokenizer, data, config: dict, log: list, progress, checkpoint=None) -> None:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    spec = config["train"]
    means, stds, prompt_index, scaling_factor = data
    noise_scheduler = DDPMScheduler(**config["scheduler"])
    # The 60 prompts and "" (index 60), tokenised once; the text encoder runs on all 61 each step (cheap) and
    # each sample picks its row.
    ids = tokenizer(list(shapes.PROMPTS) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = len(shapes.PROMPTS)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(optimizer, spec["warmup"], spec["steps"])
    ema = EMAModel(params, decay=spec["ema_decay"], use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)
    generator = torch.Generator().manual_seed(config["seed"] + 1)
    unet.train()
    text_encoder.train()
    for step in progress(range(spec["steps"]), desc="unet"):
        pick = torch.randint(0, len(means), (spec["batch"],), generator=generator)
        mean = means[pick]
        noise = torch.randn(mean.shape, generator=generator)
        latents = (mean + stds[pick] * torch.randn(mean.shape, generator=generator)) * scaling_factor
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (spec["batch"],), generator=generator)
        rows = torch.where(torch.rand(spec["batch"], generator=generator) < spec["empty_prompt"], empty,
                           prompt_index[pick])
        text = text_encoder(ids)[0][rows]
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = (prediction - noise_scheduler.get_velocity(latents, noise, timesteps)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        if step % 50 == 0 or step == spec["steps"] - 1:
            log.append({"phase": "unet", "step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        if checkpoint and step and step % checkpoint[0] == 0:  # the EMA weights so far, to watch a long run
            ema.store(params)
            ema.copy_to(params)
            checkpoint[1](step)
            ema.restore(params)
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()


def save_pipeline(out: Path, tokenizer, text_encoder, vae, unet, config: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffship.testing.tiny_models import write_pipeline

    scheduler = DDIMScheduler(**config["scheduler"], clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    write_pipeline(StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False), out)


def train(out: str | Path, config: dict = CONFIG, show_progress: bool = True, checkpoint_every: int = 0) -> Path:
    """Run both phases and write the pipeline to `out` (which must not exist yet); with checkpoint_every, also
    the EMA weights every that many UNet steps to OUT.checkpoints/step-N (they do not change the run)."""
    import torch
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; give a new directory so no earlier model is overwritten")
    torch.set_num_threads(config["threads"])
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(config["seed"])

    def progress(iterable, desc):
        return tqdm(iterable, desc=desc, disable=not show_progress, mininterval=5)

    log: list = []
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unet = build_components(config)
    train_vae(vae, config, rng, log, progress)
    vae_s = time.perf_counter() - started
    data = encode_dataset(vae, config, rng)
    def save_checkpoint(step):
        save_pipeline(out.with_name(out.name + ".checkpoints") / f"step-{step}", tokenizer, text_encoder, vae, unet,
                      config)

    train_unet(unet, text_encoder, tokenizer, data, config, log, progress,
               (checkpoint_every, save_checkpoint) if checkpoint_every else None)
    total_s = time.perf_counter() - started

    partial = out.with_name(out.name + ".partial")
    save_pipeline(partial, tokenizer, text_encoder, vae, unet, config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    (partial / "training_log.json").write_text(json.dumps({
        "config": config, "vae_seconds": round(vae_s, 1), "total_seconds": round(total_s, 1),
        "scaling_factor": data[3], "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "parameters": {"text_encoder": count(text_encoder), "vae": count(vae), "unet": count(unet)},
        "log": log}, indent=1, default=list))
    partial.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffship.testing.shapes_training",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="new directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=CONFIG["seed"])
    parser.add_argument("--threads", type=int, default=CONFIG["threads"],
                        help="torch threads (results depend on it; the shipped model used 2)")
    parser.add_argument("--vae-steps", type=int, default=CONFIG["vae"]["steps"])
    parser.add_argument("--unet-steps", type=int, default=CONFIG["train"]["steps"])
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="also save the EMA weights every N UNet steps to OUT.checkpoints/step-N")
    args = parser.parse_args(argv)
    config = json.loads(json.dumps(CONFIG))
    config["seed"], config["threads"] = args.seed, args.threads
    config["vae"]["steps"], config["train"]["steps"] = args.vae_steps, args.unet_steps
    path = train(args.out, config, checkpoint_every=args.checkpoint_every)
    log = json.loads((path / "training_log.json").read_text())
    print(f"wrote {path} in {log['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
