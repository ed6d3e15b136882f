"""Wall-clock time per pipeline stage, so every generation can say where its time went."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

from diffship.layout import (
    CONTROLNET,
    DEPTH_ESTIMATOR,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)

# The stage a component's calls count to: every text encoder is "text_encoder" (encoding the prompt), the
# denoiser's calls (a UNet's or a transformer's) are the steps: full UNet steps, and the shallow ones a step cache (DeepCache) runs between them.
STEP_STAGE = "unet"
SHALLOW_STEP_STAGE = "unet_shallow"
COMPONENT_STAGES = {TEXT_ENCODER: "text_encoder", TEXT_ENCODER_2: "text_encoder", TEXT_ENCODER_3: "text_encoder",
                    UNET: STEP_STAGE, TRANSFORMER: STEP_STAGE, UNET_SHALLOW: SHALLOW_STEP_STAGE, VAE_ENCODER: "vae_encode", VAE_DECODER: "vae_decode",
                    DEPTH_ESTIMATOR: "depth_estimator", CONTROLNET: "controlnet"}
# The ControlNets' calls (all of a step's nets together): what ControlNet adds to each step.
CONTROLNET_STAGE = "controlnet"


def stage_of(component: str) -> str:
    """The stage a component's graph runs in (a component of a new family: its own name)."""
    return COMPONENT_STAGES.get(component, component)


class StageTimer:
    """Accumulates seconds per named stage; `unet` steps (and shallow `unet_shallow` ones) are also kept one by
    one."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.unet_steps: list[float] = []
        self.shallow_steps: list[float] = []

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            if name == STEP_STAGE:
                self.unet_steps.append(elapsed)
            elif name == SHALLOW_STEP_STAGE:
                self.shallow_steps.append(elapsed)

    def summary(self, total: float, load: float | None = None) -> dict[str, float]:
        """Stages in seconds; `scheduler_and_glue` is what the named stages do not cover. `unet` counts the full
        UNet steps; a step cache's shallow steps, when it ran any, are `unet_shallow` (and its per-step and count
        figures)."""
        named = {k: v for k, v in self.seconds.items()}
        out = {
            "text_encoder": named.get("text_encoder", 0.0),
            "unet": named.get("unet", 0.0),
            "unet_per_step": (sum(self.unet_steps) / len(self.unet_steps)) if self.unet_steps else 0.0,
            "unet_steps": len(self.unet_steps),
            "vae_encode": named.get("vae_encode", 0.0),
            "vae_decode": named.get("vae_decode", 0.0),
        }
        if self.shallow_steps:
            out["unet_shallow"] = named[SHALLOW_STEP_STAGE]
            out["unet_shallow_per_step"] = sum(self.shallow_steps) / len(self.shallow_steps)
            out["unet_shallow_steps"] = len(self.shallow_steps)
        if "depth_estimator" in named:
            out["depth_estimator"] = named["depth_estimator"]
        if CONTROLNET_STAGE in named:
            out["controlnet"] = named[CONTROLNET_STAGE]
            steps = len(self.unet_steps) + len(self.shallow_steps)
            out["controlnet_per_step"] = named[CONTROLNET_STAGE] / steps if steps else 0.0
        out["scheduler_and_glue"] = max(
            total - out["text_encoder"] - out["unet"] - out.get("unet_shallow", 0.0) - out["vae_encode"]
            - out["vae_decode"] - out.get("depth_estimator", 0.0) - out.get("controlnet", 0.0), 0.0
        )
        out["total"] = total
        if load is not None:
            out["load_and_compile"] = load
        return out


def format_timings(timings: dict[str, float], denoiser: str = "UNet") -> str:
    """A small table for terminals: stage, milliseconds, share of the total. `denoiser`: what the denoising steps'
    row calls the graph (the "unet" stage holds the steps of the transformer families' denoiser too)."""
    total = timings.get("total", 0.0) or 1e-12
    rows = [
        ("text encoder", timings.get("text_encoder", 0.0), True),
        (f"{denoiser} ({timings.get('unet_steps', 0)} steps)", timings.get("unet", 0.0), True),
        (f"  {denoiser} per step", timings.get("unet_per_step", 0.0), False),
    ]
    if timings.get("unet_shallow_steps"):
        rows += [(f"UNet shallow ({timings['unet_shallow_steps']} cached steps)", timings["unet_shallow"], True),
                 ("  shallow per step", timings["unet_shallow_per_step"], False)]
    if timings.get("controlnet"):
        rows += [("ControlNet", timings["controlnet"], True),
                 ("  ControlNet per step", timings["controlnet_per_step"], False)]
    rows.append(("scheduler and glue", timings.get("scheduler_and_glue", 0.0), True))
    if timings.get("vae_encode"):
        rows.append(("VAE encode", timings["vae_encode"], True))
    if timings.get("depth_estimator"):
        rows.append(("depth estimator", timings["depth_estimator"], True))
    rows += [("VAE decode", timings.get("vae_decode", 0.0), True), ("total (generation)", total, True)]
    if "load_and_compile" in timings:
        rows.append(("load and compile", timings["load_and_compile"], False))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'ms':>10}  {'share':>6}", "-" * (width + 20)]
    for name, seconds, share in rows:
        pct = f"{100 * seconds / total:5.1f}%" if share else ""
        lines.append(f"{name:<{width}}  {seconds * 1e3:10.1f}  {pct:>6}")
    return "\n".join(lines)
