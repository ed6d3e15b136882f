"""The family registry: one module per model family, each owning what is exported and how it runs.

Adding a family is a module here (its FAMILY, export_specs and pipelines), its tests, and its line in FAMILIES.
"""

from __future__ import annotations

from diffship.errors import DiffshipError
from diffship.families.base import Family
from diffship.families.flux import FAMILY as FLUX
from diffship.families.stable_diffusion import FAMILY as STABLE_DIFFUSION
from diffship.families.stable_diffusion_3 import FAMILY as STABLE_DIFFUSION_3
from diffship.families.stable_diffusion_xl import FAMILY as STABLE_DIFFUSION_XL

FAMILIES: tuple[Family, ...] = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, STABLE_DIFFUSION_3, FLUX)
# Optimum's runtime class names carry these prefixes (ORTStableDiffusionXLPipeline, OVStableDiffusionPipeline,
# OVFluxPipeline).
_RUNTIME_PREFIXES = ("ORT", "OV")


def diffusers_class_name(class_name: str) -> str:
    """diffusers' name for a pipeline class named in a model_index.json, Optimum's prefixes removed."""
    for prefix in _RUNTIME_PREFIXES:
        if class_name.startswith(prefix) and class_name[len(prefix):].startswith(("StableDiffusion", "Latent", "Flux")):
            return class_name[len(prefix):]
    return class_name


def family_for(class_name: str | None, where) -> Family:
    """The family whose models are of the pipeline class `class_name` (model_index.json's `_class_name`)."""
    name = diffusers_class_name(class_name or "StableDiffusionPipeline")
    for family in FAMILIES:
        if name in family.class_names:
            return family
    supported = ", ".join(n for family in FAMILIES for n in family.class_names)
    raise DiffshipError(f"{where} holds a {class_name}; diffship runs {supported}")


def all_pipelines() -> list[type]:
    return [cls for family in FAMILIES for cls in family.pipelines()]


__all__ = ["FAMILIES", "Family", "all_pipelines", "diffusers_class_name", "family_for"]
