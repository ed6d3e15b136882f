"""Prompt encoding shared by the Stable Diffusion pipelines, as diffusers' `encode_prompt` does it."""

from __future__ import annotations

import logging

import numpy as np

from diffship.checks import check_int
from diffship.errors import DiffshipError

logger = logging.getLogger(__name__)


def run_text_encoder(text_encoder, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    feed_dtype = next((i.dtype for i in text_encoder.inputs if i.name == "input_ids"), np.dtype(np.int64))
    return text_encoder.run({"input_ids": input_ids.astype(feed_dtype, copy=False)})


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32)


def hidden_state_outputs(text_encoder) -> list[str]:
    """The text encoder graph's hidden_states.N outputs, in layer order (embeddings first)."""
    names = (o.name for o in text_encoder.outputs if o.name.startswith("hidden_states."))
    return sorted(names, key=lambda k: int(k.split(".")[1]))


def check_clip_skip(text_encoder, clip_skip, final_layer_norm, name: str = "clip_skip") -> None:
    """clip_skip counts layers back from the last: 0 to the encoder's layer count (its embeddings), and needs the
    hidden states and the final layer norm in the export. `name`: what errors call it."""
    if clip_skip is None:
        return
    hidden = hidden_state_outputs(text_encoder)
    if not hidden:
        raise DiffshipError(
            f"{name} needs a text encoder with hidden_states.N outputs, which this export lacks (Optimum's "
            "Stable Diffusion 1.x/2.x exports do not write them): export the model with `diffship export`"
        )
    check_int(clip_skip, name, 0, len(hidden) - 1)
    if final_layer_norm is None:
        raise DiffshipError(
            f"{name} needs the text encoder's final layer norm (text_encoder/final_layer_norm.npz), which "
            "diffship writes at export; this directory was exported without it"
        )


def check_negative_prompt(prompt, negative_prompt, batch_size: int) -> None:
    """diffusers' rule: negative_prompt has prompt's type; a list gives one negative prompt per prompt."""
    if negative_prompt is None:
        return
    if not isinstance(negative_prompt, (str, list)) or (
            isinstance(negative_prompt, list) and not all(isinstance(n, str) for n in negative_prompt)):
        raise TypeError(f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}")
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(
            f"negative_prompt should be the same type as prompt: {type(negative_prompt).__name__} != "
            f"{type(prompt).__name__}"
        )
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
        raise ValueError(
            f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}; give one per prompt"
        )


def as_list(text, batch_size: int) -> list[str]:
    """A prompt as one string per image of the batch."""
    return [text] * batch_size if isinstance(text, str) else list(text)


def check_prompts(prompts: dict, negative_prompts: dict, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                  negative_pooled_prompt_embeds, pooled_source: str) -> int:
    """diffusers' checks of the prompts and embeddings of a pipeline with one prompt per text encoder (SD3, Flux):
    `prompts` {"prompt": ..., "prompt_2": ...} and `negative_prompts` {"negative_prompt": ...} in the encoders'
    order, `pooled_source` what pooled_prompt_embeds come from (for the message). Returns the batch size."""
    prompt, others = prompts["prompt"], [name for name in prompts if name != "prompt"]
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass either prompt or prompt_embeds")
    if prompt_embeds is not None and any(text is not None for text in prompts.values()):
        raise ValueError(f"pass either prompt (and {', '.join(others)}) or prompt_embeds, not both")
    for name, text in prompts.items():
        if text is not None and not isinstance(text, (str, list)):
            raise ValueError(f"{name} must be a str or a list of str, got {type(text).__name__}")
        if isinstance(text, list) and (not text or not all(isinstance(p, str) for p in text)):
            raise ValueError(f"{name} must be a non-empty list of str")
    if negative_prompt_embeds is not None and any(text is not None for text in negative_prompts.values()):
        raise ValueError(f"pass either {' / '.join(negative_prompts)} or negative_prompt_embeds, not both")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError(f"prompt_embeds needs pooled_prompt_embeds too ({pooled_source})")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
    batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
    for name in others:
        text = prompts[name]
        if isinstance(text, list) and len(text) != batch_size:
            raise ValueError(f"{name} has {len(text)} entries but prompt has {batch_size}")
    for negative in negative_prompts.values():
        check_negative_prompt(prompt, negative, batch_size)
    if prompt_embeds is not None and negative_prompt_embeds is not None \
            and np.shape(prompt_embeds) != np.shape(negative_prompt_embeds):
        raise ValueError(f"prompt_embeds {np.shape(prompt_embeds)} and negative_prompt_embeds "
                         f"{np.shape(negative_prompt_embeds)} must have the same shape")
    return batch_size


def warn_truncated(tokenizer, texts: list[str], name: str, max_length: int) -> None:
    """Log the part of each text the tokenizer cuts to `max_length` tokens, as diffusers does for the prompt."""
    for i, removed in enumerate(tokenizer.truncated(texts, max_length)):
        if removed:
            logger.warning("%s is longer than the %d tokens the text encoder takes; this part was cut: %r",
                           name if len(texts) == 1 else f"{name} {i}", max_length, removed)


def embed(text_encoder, input_ids: np.ndarray, clip_skip: int | None = None, final_layer_norm=None) -> np.ndarray:
    """last_hidden_state, or with clip_skip (see check_clip_skip) the hidden state that many layers earlier,
    final-layer-normed."""
    outputs = run_text_encoder(text_encoder, input_ids)
    if clip_skip is None:
        return outputs["last_hidden_state"]
    return layer_norm(outputs[hidden_state_outputs(text_encoder)[-(clip_skip + 1)]], *final_layer_norm)


def encode_prompt(text_encoder, tokenizer, prompt, num_images_per_prompt, do_classifier_free_guidance,
                  negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None,
                  final_layer_norm=None):
    """(prompt_embeds, negative_prompt_embeds), each repeated num_images_per_prompt times per prompt."""
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts)
        warn_truncated(tokenizer, prompts, "prompt", tokenizer.model_max_length)
        prompt_embeds = embed(text_encoder, tokenizer(prompts), clip_skip, final_layer_norm)
    else:
        prompt_embeds = np.asarray(prompt_embeds, dtype=np.float32)
        batch_size = prompt_embeds.shape[0]
    prompt_embeds = np.repeat(prompt_embeds, num_images_per_prompt, axis=0)

    if do_classifier_free_guidance and negative_prompt_embeds is None:
        # Checked by check_negative_prompt: a str goes with one prompt (or with prompt_embeds), a list has one
        # entry per prompt.
        if negative_prompt is None:
            uncond_tokens = [""] * batch_size
        elif isinstance(negative_prompt, str):
            uncond_tokens = [negative_prompt] * batch_size
        else:
            uncond_tokens = list(negative_prompt)
        warn_truncated(tokenizer, uncond_tokens, "negative_prompt", prompt_embeds.shape[1])
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
