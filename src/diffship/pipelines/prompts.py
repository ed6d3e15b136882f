"""Prompt encoding shared by the Stable Diffusion pipelines, as diffusers' `encode_prompt` does it."""

from __future__ import annotations

import numpy as np

from diffship.errors import DiffshipError


def run_text_encoder(text_encoder, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    feed_dtype = next((i.dtype for i in text_encoder.inputs if i.name == "input_ids"), np.dtype(np.int64))
    return text_encoder.run({"input_ids": input_ids.astype(feed_dtype, copy=False)})


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32)


def embed(text_encoder, input_ids: np.ndarray, clip_skip: int | None = None, final_layer_norm=None) -> np.ndarray:
    """last_hidden_state, or with clip_skip the hidden state that many layers earlier, final-layer-normed."""
    outputs = run_text_encoder(text_encoder, input_ids)
    if clip_skip is None:
        return outputs["last_hidden_state"]
    hidden = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
    if not hidden:
        raise DiffshipError(
            "clip_skip needs a text encoder with hidden_states.N outputs, which this export lacks (Optimum's "
            "Stable Diffusion 1.x/2.x exports do not write them): export the model with `diffship export`"
        )
    if not 0 <= clip_skip < len(hidden):
        raise ValueError(f"clip_skip must be between 0 and {len(hidden) - 1}, got {clip_skip}")
    if final_layer_norm is None:
        raise DiffshipError(
            "clip_skip needs the text encoder's final layer norm (text_encoder/final_layer_norm.npz), which "
            "diffship writes at export; this directory was exported without it"
        )
    return layer_norm(outputs[hidden[-(clip_skip + 1)]], *final_layer_norm)


def encode_prompt(text_encoder, tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                  negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None,
                  final_layer_norm=None):
    """(prompt_embeds, negative_prompt_embeds), each repeated num_images_per_prompt times per prompt."""
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts)
        prompt_embeds = embed(text_encoder, tokenizer(prompts), clip_skip, final_layer_norm)
    else:
        prompt_embeds = np.asarray(prompt_embeds, dtype=np.float32)
        batch_size = prompt_embeds.shape[0]
    prompt_embeds = np.repeat(prompt_embeds, num_images_per_prompt, axis=0)

    if do_classifier_free_guidance and negative_prompt_embeds is None:
        if negative_prompt is None:
            uncond_tokens = [""] * batch_size
        elif prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"negative_prompt should be the same type as prompt: {type(negative_prompt).__name__} != "
                f"{type(prompt).__name__}"
            )
        elif isinstance(negative_prompt, str):
            uncond_tokens = [negative_prompt] * batch_size if prompt is None else [negative_prompt]
        elif batch_size != len(negative_prompt):
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}; give one per prompt"
            )
        else:
            uncond_tokens = list(negative_prompt)
        uncond_ids = tokenizer(uncond_tokens, max_length=prompt_embeds.shape[1])
        # diffusers applies clip_skip to the prompt only, not to the negative prompt.
        negative_prompt_embeds = embed(text_encoder, uncond_ids)
    if do_classifier_free_guidance:
        negative_prompt_embeds = np.repeat(np.asarray(negative_prompt_embeds, np.float32), num_images_per_prompt, 0)
        if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(
                f"negative_prompt_embeds batch {negative_prompt_embeds.shape[0]} does not match "
                f"prompt_embeds batch {prompt_embeds.shape[0]}"
            )
    return prompt_embeds, negative_prompt_embeds
