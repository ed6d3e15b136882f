"""The names and files of an exported pipeline directory, defined once.

The layout is Optimum's, so that its exports load in diffship and diffship's in Optimum: `model_index.json`, one
folder per component named by its role, each with its `config.json` and its graph (`model.onnx`, plus
`model.onnx_data` past 2 GB, or `openvino_model.xml/.bin`). Exporters, runtimes, pipelines, benchmarks and the CLI
read these names from here; a family module (diffship.families) says which roles it has.
"""

from __future__ import annotations

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
REPORT_FILE = "export_report.json"

# Graph components, by role.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"  # SD3's T5 encoder
UNET = "unet"
# The diffusion transformers' denoiser (SD3, Flux): the role a UNet has in the UNet families.
TRANSFORMER = "transformer"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
DEPTH_ESTIMATOR = "depth_estimator"
# DeepCache's shallow UNet (`export --deepcache`): the steps between two full UNet steps run it on the deep feature
# the last full step output beside out_sample. Not in model_index.json: Optimum's loaders know no such component.
UNET_SHALLOW = "unet_shallow"
# ControlNets (`export --controlnet`): the first in controlnet/, the next in controlnet_1/, controlnet_2/, ... (the
# folders diffusers' MultiControlNetModel.save_pretrained writes). Their UNet takes the residuals they output.
CONTROLNET = "controlnet"
GRAPH_COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNET, UNET_SHALLOW, TRANSFORMER, VAE_ENCODER,
                    VAE_DECODER, DEPTH_ESTIMATOR, CONTROLNET)
# The dtypes a graph is exported in (export's `dtype`, `--dtype`).
EXPORT_DTYPES = ("fp32", "fp16")
# A ControlNet's outputs, and the UNet inputs they are added at (diffusers' UNet2DConditionModel.forward arguments).
DOWN_BLOCK_RES_SAMPLE = "down_block_res_samples.{}"
MID_BLOCK_RES_SAMPLE = "mid_block_res_sample"
DOWN_BLOCK_ADDITIONAL_RESIDUAL = "down_block_additional_residuals.{}"
MID_BLOCK_ADDITIONAL_RESIDUAL = "mid_block_additional_residual"
# The tensor a DeepCache export's UNet outputs second (after out_sample) and its unet_shallow takes.
DEEP_FEATURES = "deep_features"
# The input an SD3 transformer exported with --skip-layer-guidance takes after timestep: bool [num_layers], True
# where that joint block is skipped (diffusers' `skip_layers`); all False is the plain transformer.
SKIP_LAYERS = "skip_layers"

# Plain-file components, copied from the source model as they are.
TOKENIZER = "tokenizer"
TOKENIZER_2 = "tokenizer_2"
TOKENIZER_3 = "tokenizer_3"  # SD3's T5 tokenizer
SCHEDULER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"
FEATURE_EXTRACTOR = "feature_extractor"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# diffusers components diffship exports and runs nothing for: None in a pipeline's `components`, as diffusers has
# them for a model without them.
SAFETY_CHECKER = "safety_checker"
IMAGE_ENCODER = "image_encoder"
# The diffusers folder the VAE's two graphs come from.
SOURCE_VAE = "vae"

# Graph files, per format.
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx_data"
# The UNet-type graphs' copy for ONNX Runtime on the CPU, beside model.onnx (exporters/formats.py): attention as
# onnxruntime's MultiHeadAttention (its tiled CPU kernel), reading model.onnx's weights (the same file and names).
# model.onnx stays the portable graph that TensorRT, Optimum and other ONNX consumers read.
ORT_CPU_MODEL = "model_ort_cpu.onnx"
OPENVINO_MODEL = "openvino_model.xml"
OPENVINO_WEIGHTS = "openvino_model.bin"
GRAPH_FILES = (ONNX_MODEL, OPENVINO_MODEL)
# TensorRT engines, built from model.onnx for one GPU model and TensorRT version (runtimes/engines.py): the ONNX
# graph stays the component's graph, an engine beside it is what an export built, its key in the info file.
TENSORRT_ENGINE = "model.plan"
TENSORRT_ENGINE_INFO = "model.plan.json"

# OpenVINO GenAI's forms. Its C++ pipelines tokenize with OpenVINO models (openvino-tokenizers writes them into each
# tokenizer folder) and feed a UNet's timestep as int64 of shape [1]: the OpenVINO export declares that form and
# converts to float first thing, and diffship's runtime takes the float input beneath that Convert back, so that
# fractional timesteps (Karras sigmas, Heun, linspace spacing) reach the UNet unrounded.
OPENVINO_TOKENIZER = "openvino_tokenizer.xml"
OPENVINO_DETOKENIZER = "openvino_detokenizer.xml"
TIMESTEP = "timestep"

# The components LoRA files adapt in the UNet families (diffusers' `_lora_loadable_modules`), and the map written
# beside each of their graphs in a `swappable_lora` export: which graph weight holds which layer's weight
# (graphs/weight_map.py), what run-time LoRA (pipelines/lora.py) swaps.
LORA_COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
LORA_WEIGHTS = "lora_weights.json"

# Written at export beside a CLIP text encoder graph: clip_skip applies this norm to an earlier hidden state.
FINAL_LAYER_NORM_FILE = "final_layer_norm.npz"

# Image sides are multiples of 8 (diffusers' rule for Stable Diffusion, whose VAE scales by 8; a VAE with a larger
# factor asks for multiples of its own).
IMAGE_SIZE_MULTIPLE = 8


def controlnet_folder(index: int) -> str:
    """The folder of an export's `index`-th ControlNet (from 0): controlnet, controlnet_1, controlnet_2, ..."""
    return CONTROLNET if index == 0 else f"{CONTROLNET}_{index}"


def vae_scale_factor(block_out_channels) -> int:
    """Image pixels per latent pixel: the VAE halves the size at every block but the last (8 for SD's four)."""
    return 2 ** (len(block_out_channels) - 1)
