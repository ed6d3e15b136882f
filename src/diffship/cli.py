"""The `diffship` command: one verb per job.

  diffship tiny-model OUT             write a tiny (or full-size, random-weight) diffusers pipeline
  diffship export MODEL OUT           export to ONNX and/or OpenVINO, validated against PyTorch
  diffship generate DIR --prompt ...  generate images with the numpy pipeline, print per-stage timings
  diffship inspect PATH               describe a graph or an exported directory
  diffship bench DIR                  per-stage latency on each backend, side by side
  diffship serve DIR                  serve it over HTTP with Ray Serve (replicas, batching, OpenAI's images API)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
from pathlib import Path

from diffship.checks import (
    MAX_IMAGE_SIDE,
    MAX_SEED,
    check_image_size,
    check_int,
    check_number,
    check_output_dir,
    check_output_file,
    check_scheduler_name,
    software_exif,
)
from diffship.errors import DiffshipError
from diffship.layout import EXPORT_DTYPES, REPORT_FILE, UNET
from diffship.pipelines.precision import INFERENCE_PRECISIONS
from diffship.testing.tiny_models import KINDS as TINY_KINDS


INFERENCE_PRECISION_HELP = ("how OpenVINO computes: auto (default: bf16 for the components whose bf16 error the "
                            "export measured within bound, on a CPU with bf16; f32 elsewhere), f32 (exact, as "
                            "PyTorch), bf16, f16, or default (the CPU plugin's own choice)")
EXPORTED_HELP = ("an exported pipeline (diffship's or Optimum's): a directory, or a hub repo id (org/name) where no "
                 "such directory exists, downloaded with only the files its backend reads")
SIZE_HELP = f"a multiple of 8 from 8 to {MAX_IMAGE_SIDE} pixels (default: the model's)"


def _atol(value: str):
    """--atol 1e-3 for every component, or --atol unet=1e-3,vae_decoder=2e-3."""
    try:
        if "=" not in value:
            return float(value)
        pairs = [p.split("=", 1) for p in value.split(",") if p]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a number nor COMPONENT=NUMBER pairs (e.g. unet=1e-3,vae_decoder=2e-3)") from None


def _add_tiny_model(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny deterministic diffusers pipeline (for tests and demos)",
                       description="Write a tiny Stable Diffusion pipeline built from configs with fixed seeds.")
    p.add_argument("out", type=Path, help="output directory (diffusers format)")
    p.add_argument("--kind", choices=[k for k in TINY_KINDS if not k.startswith("full-size")], default=None,
                   help="sd1: epsilon prediction; sd2: v_prediction, linear projections, upcast attention; "
                        "sd1-inpaint: sd1 with a 9-channel inpainting UNet; sd2-depth: sd2 with a 5-channel UNet "
                        "and a tiny DPT depth estimator; sd1-lcm: sd1 as a Latent Consistency Model; sd-turbo: sd2 "
                        "with the Turbo scheduler; sdxl, sdxl-refiner, sdxl-inpaint (9 channels), sdxl-lcm, "
                        "sdxl-turbo: the SDXL family in small (default sd1)")
    p.add_argument("--full-size", action="store_true",
                   help="the full SD1.5 architecture with random weights (about 4 GB, for benchmarks); with "
                        "--kind sdxl, SDXL 1.0's (about 14 GB); with --kind sd3, SD3 Medium's transformer and VAE "
                        "(about 8.5 GB; text encoders of SD3's widths but two layers, T5-XXL being past this "
                        "size)")
    p.add_argument("--trained", action="store_true",
                   help="the trained shapes model shipped with diffship: 64x64 pictures of 'a {red,green,blue,"
                        "yellow} {circle,square,triangle} on the {left,right,top,bottom,center}' (real images, "
                        "not noise; DDIM, guidance about 6)")
    p.add_argument("--seed", type=int, default=None,
                   help="weight seed of the random-weight kinds, 0 to 2**64-1 (default 0)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a diffusers pipeline to ONNX / OpenVINO, validated against PyTorch",
                       description="Export one graph per component (text_encoder, unet, vae_encoder, vae_decoder) "
                                   "in Optimum's layout; each is validated against PyTorch on the target backend.")
    p.add_argument("model", help="a local diffusers directory, or a hub repo id (org/name) where no such directory "
                                 "exists")
    p.add_argument("out", type=Path,
                   help="output directory: new, empty, or (with --overwrite) a previous diffship export; written "
                        "in a staging folder beside it and renamed at the end")
    p.add_argument("--backend", action="append", default=None,
                   help="onnx, openvino, tensorrt, or several (repeat the flag or give onnx,openvino); default onnx. "
                        "tensorrt also writes the ONNX graphs and builds an engine per component beside them on "
                        "this machine's NVIDIA GPU (needs diffship[tensorrt])")
    p.add_argument("--height", type=int,
                   help="image height the graphs are traced at, a multiple of 8 (default: the model's); dynamic "
                        "graphs run any size")
    p.add_argument("--width", type=int, help="image width the graphs are traced at, as --height")
    p.add_argument("--batch-size", type=int, default=1, help="images per call the graphs are traced at, 1 to 256")
    p.add_argument("--static", action="store_true", help="fix batch, height and width in the graphs")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 to 20 (default 17)")
    p.add_argument("--atol", type=_atol, default=None,
                   help="max abs error vs PyTorch: one value, or per component (unet=1e-3,vae_decoder=2e-3)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a previous diffship export holding only the files that export wrote "
                        "(nothing else is ever replaced)")
    _add_hub_flags(p)
    p.add_argument("--variant",
                   help="hub or local weights variant to load, e.g. fp16: *.fp16.safetensors where a component has "
                        "them (as diffusers' variant=); the graphs are exported in --dtype all the same")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled .bin weights where a component has no safetensors (pickles run code "
                        "when loaded: only for sources you trust)")
    p.add_argument("--dtype", action="append", type=_dtype_flag, metavar="[COMPONENT=]{fp32,fp16}",
                   help="fp16 halves the graphs; the VAE stays fp32 unless --vae-fp16 mixed (overflow protection). "
                        "COMPONENT=fp16 sets one component's (repeat: --dtype transformer=fp16 --dtype "
                        "text_encoder_3=fp16 leaves the rest fp32); default fp32")
    p.add_argument("--vae-fp16", choices=["fp32", "mixed", "none"], default="fp32",
                   help="with --dtype fp16: keep the VAE fp32 (default), keep only its overflowing nodes fp32 "
                        "(mixed), or convert it all (none: SD2/SDXL VAEs then overflow to NaN)")
    p.add_argument("--optimize", action="store_true",
                   help="clean the graphs (constant folding, dead nodes) and fuse them for onnxruntime")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                   help="what the onnxruntime fusions are for (CUDA-only fused ops are not used for cpu)")
    p.add_argument("--weight-format", choices=["int8", "int4"],
                   help="compress weights: onnxruntime dynamic int8 / int4 MatMulNBits; NNCF for OpenVINO")
    p.add_argument("--quantize", choices=["hybrid"],
                   help="OpenVINO: int8 activations for the UNet too, calibrated on real prompts (as Optimum Intel)")
    p.add_argument("--deepcache", action="store_true",
                   help="DeepCache step caching: the UNet also outputs its deep feature (deep_features) and a small "
                        "unet_shallow graph is added; generate with cache='deepcache' (--cache deepcache) to run it "
                        "between full UNet steps")
    p.add_argument("--deepcache-branch", type=int, default=0,
                   help="with --deepcache: where the shallow UNet joins the cached feature, 0 (the shallowest and "
                        "fastest, the default) to the UNet's layers per block")
    p.add_argument("--skip-layer-guidance", action="store_true",
                   help="SD3: the transformer also takes skip_layers, so that generate's --skip-guidance-layers "
                        "(diffusers' skip_guidance_layers, e.g. 7,8,9 for SD3.5 medium) runs; Optimum's and "
                        "OpenVINO GenAI's pipelines cannot feed that input")
    p.add_argument("--trt-static", action="store_true",
                   help="TensorRT: build the engines for exactly --batch-size, --height and --width (fastest, CUDA "
                        "graphs); default: a range around them (sides half to twice, 1 to --trt-max-batch images)")
    p.add_argument("--trt-max-batch", type=int, default=None,
                   help="TensorRT: the most images per call a dynamic engine runs (default max(--batch-size, 4))")
    p.add_argument("--trt-precision", choices=["fp32", "tf32", "fp16", "bf16", "strongly_typed"], default=None,
                   help="TensorRT: fp32 (TF32 off, as PyTorch), tf32, fp16 or bf16 (TensorRT 10 picks kernels "
                        "layer by layer), strongly_typed (the graph's own types); default strongly_typed for "
                        "--dtype fp16, fp32 otherwise")
    p.add_argument("--textual-inversion", action="append", metavar="FILE[:TOKEN]",
                   help="a textual inversion embedding (diffusers or Automatic1111 format, multi-vector, SDXL's "
                        "clip_l/clip_g) added to the tokenizers and text encoders under TOKEN (default: the file's "
                        "own token, or its name); repeat for several")
    p.add_argument("--controlnet", action="append", metavar="MODEL",
                   help="a ControlNet (a diffusers ControlNetModel folder or hub id) exported beside the model; "
                        "repeat for several (controlnet/, controlnet_1/, ...). The UNet then takes their residuals")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors, diffusers/PEFT or kohya format) fused into the exported weights at "
                        "SCALE (default 1); repeat for several. UNet and text-encoder layers, convolutions too")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (each component's stage: tracing, passes, validation)")
    p.add_argument("--swappable-lora", action="store_true",
                   help="keep the weights LoRA adapts swappable, so that pipe.load_lora_weights / set_adapters / "
                        "unload_lora_weights change them at run time without re-exporting (no --optimize, "
                        "--weight-format, --quantize or --deepcache with it)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images from an exported pipeline (no torch)",
                       description="Generate with the numpy pipeline; prints a per-stage timing table. The task "
                                   "follows the inputs: text-to-image; --image: image-to-image (depth-to-image "
                                   "on a depth model); --image and --mask: inpainting.")
    p.add_argument("model_dir", help=EXPORTED_HELP)
    _add_hub_flags(p)
    p.add_argument("--prompt", required=True, action="append", help="the prompt; repeat for a batch")
    p.add_argument("--negative-prompt", action="append", default=None,
                   help="what to steer away from: once for every prompt, or once per --prompt, in order")
    p.add_argument("--steps", type=int, default=None,
                   help="num_inference_steps: 1 to the scheduler's num_train_timesteps (1000); default: the "
                        "pipeline's, as diffusers' (50; SD3 28; LCM 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance_scale, a finite number (<= 1 turns guidance off); default: the pipeline's, as "
                        "diffusers' (SD 7.5, SDXL 5.0, SD3 7.0)")
    p.add_argument("--seed", type=int, default=None, help="0 to 2**64-1 (default: a random one)")
    p.add_argument("--height", type=int, help=SIZE_HELP)
    p.add_argument("--width", type=int, help=SIZE_HELP)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt, at least 1")
    p.add_argument("--scheduler", help="e.g. euler, euler-a, ddim, pndm, dpm++2m-karras (default: the model's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise weight, 0 to 1")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="use the text encoder's hidden state this many layers before the last: 0 to its layers")
    p.add_argument("--backend", default=None,
                   help="onnxruntime, openvino or tensorrt (default: the one the export's graphs are for, onnxruntime "
                        "where it holds both, openvino where an OpenVINO-only flag is given)")
    p.add_argument("--provider", action="append",
                   help="onnxruntime execution provider(s): cpu, cuda or tensorrt (onnxruntime-gpu's, pip install "
                        "'diffship[gpu]'), or a full name such as CUDAExecutionProvider (--backend onnxruntime)")
    p.add_argument("--device", default=None, help="OpenVINO device (CPU, GPU, ...; --backend openvino)")
    p.add_argument("--static", action="store_true", help="OpenVINO: reshape the graphs to static shapes first")
    p.add_argument("--inference-precision", choices=INFERENCE_PRECISIONS, default="auto", help=INFERENCE_PRECISION_HELP)
    p.add_argument("--out", type=Path, default=Path("image.png"),
                   help="output image (an extension PIL writes: .png, .jpg, ...); with several images, OUT_0.png, "
                        "OUT_1.png, ...")
    p.add_argument("--json", type=Path, help="also write the timings as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out / --json files that exist although diffship did not write them (images "
                        "diffship saved are replaced without it)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--show", action="store_true",
                   help="also draw the image in the terminal (24-bit colour, 64 columns at most)")
    p.add_argument("--image", type=Path,
                   help=f"input image: image-to-image (at most {MAX_IMAGE_SIDE} pixels a side, rounded down to a "
                        "multiple of the VAE's scale factor), or inpainting with --mask")
    p.add_argument("--mask", type=Path, help="inpainting mask (white: repaint, black: keep); needs --image")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors, diffusers/PEFT or kohya format) applied at run time at SCALE (default "
                        "1); repeat for several. Needs an export made with --swappable-lora")
    p.add_argument("--textual-inversion", action="append", metavar="FILE[:TOKEN]",
                   help="a textual inversion embedding (.safetensors) added at run time under TOKEN (default: the "
                        "file's token, or its name); repeat for several. Needs an export made with --swappable-lora")
    p.add_argument("--strength", type=float, default=None,
                   help="how far to move from --image, 0..1 (default: the pipeline's, 0.8 or 1.0 for inpainting)")
    p.add_argument("--control-image", type=Path, action="append",
                   help="a ControlNet's conditioning image (an export made with --controlnet); repeat it, one per "
                        "ControlNet, in the export's order")
    p.add_argument("--controlnet-scale", type=float, action="append",
                   help="controlnet_conditioning_scale: one for all ControlNets or one per ControlNet (default: the "
                        "pipeline's, 1.0 for text-to-image)")
    p.add_argument("--depth-map", type=Path,
                   help="depth-to-image: a depth image (8/16-bit grayscale) instead of the model's estimator")
    _add_step_cache_flags(p)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a model file or an exported directory",
                       description="Inputs/outputs with dtypes and shapes, op histogram, parameter count, size on "
                                   "disk, weight precision, the graph passes applied and the validation figures.")
    p.add_argument("path", type=Path, help="model.onnx, openvino_model.xml, or an exported directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="per-stage latency of an exported pipeline on each backend, side by side",
                       description="Each backend runs in its own process (its cold start and peak RSS are its own); "
                                   "the backends run in turn, run by run. Prints medians (UNet steps: median and "
                                   "p90) per stage; --json, --markdown and --plot write them.")
    p.add_argument("model_dir", help=EXPORTED_HELP)
    _add_hub_flags(p)
    p.add_argument("--backend", action="append", default=None,
                   help="onnxruntime, openvino, tensorrt (repeat or comma-separate); default: every installed "
                        "backend that runs the export's graphs (for a hub repo: the one its graphs are for)")
    p.add_argument("--height", type=int, help=SIZE_HELP)
    p.add_argument("--width", type=int, help=SIZE_HELP)
    p.add_argument("--steps", type=int, default=25, help="num_inference_steps, at least 1")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per call, at least 1")
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs per backend, at least 1 (the figures are their medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per backend first, 0 or more")
    p.add_argument("--static", action="store_true",
                   help="OpenVINO: reshape the graphs to static shapes first; TensorRT: engines built for exactly "
                        "the request, replayed as CUDA graphs")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                   help="onnxruntime's execution provider: cuda and tensorrt are onnxruntime-gpu's (pip install "
                        "'diffship[gpu]')")
    p.add_argument("--inference-precision", choices=INFERENCE_PRECISIONS, default=None,
                   help=INFERENCE_PRECISION_HELP)
    _add_step_cache_flags(p)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="guidance_scale, a finite number (<= 1 turns guidance off)")
    p.add_argument("--scheduler", help="e.g. euler, ddim, dpm++2m-karras (default: the model's)")
    p.add_argument("--task", choices=["text-to-image", "image-to-image"], default="text-to-image",
                   help="image-to-image also times the VAE encoder (on a generated picture)")
    p.add_argument("--strength", type=float, default=None, help="image-to-image strength, 0 to 1 (default 0.75)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**64-1")
    p.add_argument("--roofline", action="store_true",
                   help="count the UNet's FLOPs (needs the onnx package) and measure the matmul peak, to give "
                        "achieved GFLOP/s and percent of peak")
    p.add_argument("--json", type=Path, help="write the figures as JSON (schema diffship-bench/1)")
    p.add_argument("--markdown", type=Path, help="write a Markdown table")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart of the stages")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --json / --markdown / --plot files that exist although diffship did not write them")


def _add_serve(sub) -> None:
    from diffship.serving.options import (
        DEFAULT_BATCH_WAIT_MS,
        DEFAULT_HOST,
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_QUEUED_REQUESTS,
        DEFAULT_PORT,
        DEFAULT_REQUEST_TIMEOUT_S,
    )

    p = sub.add_parser("serve", help="serve an exported pipeline over HTTP with Ray Serve (needs diffship[serve])",
                       description="A Ray Serve application: POST /generate (diffusers' argument names), POST "
                                   "/v1/images/generations (OpenAI's images API), GET /health, /ready, /metrics. "
                                   "Ray is started here (no dashboard; HTTP on --host) unless --address names a "
                                   "cluster. Ctrl-C drains the requests in flight and stops.")
    p.add_argument("model_dir", help=EXPORTED_HELP)
    p.add_argument("--backend", default=None,
                   help="onnxruntime or openvino (default: the one the export's graphs are for)")
    p.add_argument("--replicas", type=int, default=None, help="model replicas, at least 1 (default 1)")
    p.add_argument("--autoscale", default=None,
                   help="MIN:MAX: Ray Serve adds and removes model replicas between MIN (at least 1) and MAX with "
                        "the load, instead of --replicas")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="concurrent requests with the same size, steps, scheduler and guidance run as one batch of "
                        f"up to this many; 1 turns batching off (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help=f"how long a batch waits to fill, in ms, 0 or more (default {DEFAULT_BATCH_WAIT_MS:g})")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per replica's graphs, and the Ray CPUs each replica reserves (default: the "
                        "backend's, every core, reserving 1)")
    p.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                   help="requests that may wait for a model replica; past them the server answers 503 with "
                        f"Retry-After (default {DEFAULT_MAX_QUEUED_REQUESTS})")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help=f"seconds a request may take before it is answered 504 (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0: "
                                                        "every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port, 1 to 65535 (default {DEFAULT_PORT})")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster's address (e.g. ray://head:10001 or auto); default: start Ray here")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like diffship's own (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffship", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny_model(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_inspect(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def cmd_tiny_model(args) -> None:
    check_output_dir(args.out, "OUT")
    if args.seed is not None:
        check_int(args.seed, "--seed", 0, MAX_SEED)
    if args.trained:
        if args.full_size or args.kind is not None or args.seed is not None:
            raise DiffshipError("--trained writes the shipped shapes model; it cannot be combined with --kind, "
                                "--full-size or --seed")
        from diffship.testing.shapes import save_trained_pipeline

        print(f"wrote the trained shapes model to {save_trained_pipeline(args.out)}")
        return
    if args.full_size and args.kind not in (None, "sdxl", "sd3"):
        raise DiffshipError(f"--full-size writes SD 1.5's architecture, with --kind sdxl SDXL's, with --kind sd3 "
                            f"SD3 Medium's; not --kind {args.kind}")
    from diffship.testing.tiny_models import save_tiny_pipeline

    if args.full_size:
        kind = {"sdxl": "full-size-sdxl", "sd3": "full-size-sd3"}.get(args.kind, "full-size")
    else:
        kind = args.kind or "sd1"
    path = save_tiny_pipeline(args.out, kind, seed=args.seed or 0)
    print(f"wrote {kind} pipeline to {path}")


def _add_hub_flags(p) -> None:
    """How a hub repo id is resolved (huggingface_hub's arguments, as diffusers names them)."""
    p.add_argument("--revision", help="hub revision: branch, tag or commit (default main)")
    p.add_argument("--cache-dir", help="the hub cache to download into and read from (default: huggingface_hub's, "
                                       "$HF_HUB_CACHE)")
    p.add_argument("--token", help="hub token for private or gated repos (default: the one `hf auth login` saved)")
    p.add_argument("--local-files-only", action="store_true",
                   help="no network: use the hub cache only (HF_HUB_OFFLINE=1 does the same)")


def _hub_kwargs(args) -> dict:
    return {"revision": args.revision, "cache_dir": args.cache_dir, "token": args.token,
            "local_files_only": args.local_files_only}


def _add_step_cache_flags(p) -> None:
    p.add_argument("--skip-guidance-layers", type=_layer_list, metavar="N[,N...]",
                   help="SD3 skip-layer guidance: the transformer blocks skipped in the extra guidance pass (7,8,9 for "
                        "SD3.5 medium); needs an export made with --skip-layer-guidance")
    p.add_argument("--cache", choices=["deepcache", "taylorseer"],
                   help="step caching: deepcache runs the shallow UNet on the last full step's deep feature between "
                        "full steps (UNet families, an export made with --deepcache); taylorseer forecasts the "
                        "denoiser's output between full steps from a Taylor series of the full steps' (any family, "
                        "any export)")
    p.add_argument("--cache-interval", type=int, default=None,
                   help="with --cache: a full denoiser step every N steps, at least 1 (default: deepcache 3, "
                        "taylorseer 5)")
    p.add_argument("--cache-start", type=int, default=None,
                   help="with --cache: the steps before this index all run in full (default: deepcache 0, "
                        "taylorseer 3)")


def cmd_export(args) -> None:
    from diffship.exporters import export
    from diffship.exporters.export_pipeline import check_arguments, check_tensorrt_export
    from diffship.exporters.lora import check_loras
    from diffship.exporters.optimize import component_dtypes
    from diffship.exporters.textual_inversion import check_textual_inversions
    from diffship.pipelines.lora import parse_lora_flag
    from diffship.pipelines.textual_inversion import parse_textual_inversion_flag

    # The checks export() makes, first under the flags' names.
    def flag(argument: str) -> str:
        return "--" + argument.replace("tensorrt_", "trt_").replace("_", "-")

    component_dtypes(_dtypes(args.dtype), "--dtype")
    formats, _ = check_arguments(backend=args.backend or ["onnx"], height=args.height, width=args.width,
                                 batch_size=args.batch_size, opset=args.opset, atol=args.atol,
                                 deepcache=args.deepcache, deepcache_branch=args.deepcache_branch, name=flag)
    check_tensorrt_export(formats, args.trt_static, args.trt_precision, args.trt_max_batch, name=flag)
    loras = check_loras([parse_lora_flag(text) for text in args.lora or []], args.allow_pickle, "--lora")
    embeddings = check_textual_inversions([parse_textual_inversion_flag(text) for text in args.textual_inversion or []],
                                          args.allow_pickle, "--textual-inversion")
    from diffship.exporters.controlnet import check_controlnets, controlnet_folder
    from diffship.hub import HubOptions

    # --revision is the model's; a ControlNet hub id is fetched at its default branch.
    controlnets = check_controlnets(args.controlnet, HubOptions(None, args.cache_dir, args.token,
                                                                args.local_files_only), args.allow_pickle,
                                    "--controlnet")
    out = export(args.model, args.out, backend=args.backend or ["onnx"], height=args.height, width=args.width,
                 batch_size=args.batch_size, static=args.static, opset=args.opset, atol=args.atol,
                 overwrite=args.overwrite, **_hub_kwargs(args), variant=args.variant, allow_pickle=args.allow_pickle,
                 dtype=_dtypes(args.dtype), optimize=args.optimize, progress=not args.no_progress,
                 target=args.target, weight_format=args.weight_format, quantize=args.quantize,
                 vae_fp16=args.vae_fp16, deepcache=args.deepcache, deepcache_branch=args.deepcache_branch,
                 loras=loras, textual_inversions=embeddings, swappable_lora=args.swappable_lora,
                 tensorrt_static=args.trt_static, tensorrt_precision=args.trt_precision,
                 tensorrt_max_batch=args.trt_max_batch,
                 controlnet=controlnets or None, skip_layer_guidance=args.skip_layer_guidance)
    report = json.loads((out / REPORT_FILE).read_text())
    print(f"exported to {out}")
    for lora in report.get("loras", []):
        print(f"  LoRA {lora['file']} fused at scale {lora['scale']:g} (sha256 {lora['sha256'][:12]})")
    for i, controlnet in enumerate(report.get("controlnets", [])):
        print(f"  ControlNet {controlnet['source']} -> {controlnet_folder(i)}/")
    for embedding in report.get("textual_inversions", []):
        print(f"  textual inversion {embedding['file']}: tokens {' '.join(embedding['tokens'])}")
    for name, entry in report["components"].items():
        figures = ", ".join(
            f"{b} {v['precision']} max abs {v['max_abs']:.2e} " + (f"(atol {v['atol']:g})" if "atol" in v
                                                                 else f"max rel {v['max_rel']:.2e} (rtol {v['rtol']:g})")
            for b, v in entry["validation"].items()
        )
        bf16 = (entry.get("inference_precision") or {}).get("openvino")
        if bf16 and bf16.get("bf16"):
            figures += (f"; bf16 inference max rel {bf16['bf16']['max_rel']:.2e} (rtol {bf16['bf16']['rtol']:g}): "
                        f"runs {bf16['choice']}")
        cpu = entry.get("onnxruntime_cpu")
        if cpu:
            figures += (f"; {cpu['file']} ({cpu['multihead_attention']} attentions on MultiHeadAttention, for the "
                        f"CPU) max abs {cpu['validation']['max_abs']:.2e}")
        print(f"  {name:<13} {figures}")
    for name, entry in report.get("tokenizers", {}).items():
        same = entry["checked_prompts"] - len(entry["mismatches"])
        line = f"openvino-tokenizers (for OpenVINO GenAI): {same} of {entry['checked_prompts']} check prompts as the tokenizer"
        if entry["mismatches"]:
            first = entry["mismatches"][0]
            line += f"; GenAI will tokenize some prompts differently, e.g. {first[:40] + '...' if len(first) > 40 else first!r}"
        print(f"  {name:<13} {line}")


@contextlib.contextmanager
def _flag(flag: str):
    """Name `flag` in a DiffshipError raised by a check that does not know it."""
    try:
        yield
    except DiffshipError as e:
        raise DiffshipError(f"{flag}: {e}") from None


def _read_image(path: Path, flag: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DiffshipError(f"{flag} {path} does not exist") from None
    # PIL reports a file it cannot decode with OSError, SyntaxError (broken PNG chunks), ValueError or EOFError,
    # and one too large to be safe with DecompressionBombError.
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DiffshipError(f"{flag} {path} is not an image PIL can read: {e}") from None


def _image_paths(out: Path, count: int) -> list[Path]:
    """Where `count` generated images go: OUT itself, or OUT_0, OUT_1, ... beside it."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def _generate_backend(args) -> str | None:
    """--backend; when not given, the backend that --provider (onnxruntime) or --device, --static and the bf16/f16
    inference precisions (openvino) are for, else the one the export's graphs are for (None for a hub repo: its
    file listing chooses, before the download)."""
    from diffship.hub import is_local
    from diffship.runtimes import backend_name, choose_backend, graph_folders

    if args.backend is not None:
        with _flag("--backend"):
            return backend_name(args.backend)
    if args.provider:
        return "onnxruntime"
    if args.device or args.static or args.inference_precision not in ("auto", "f32"):
        return "openvino"
    if not is_local(args.model_dir):
        return None
    folders = graph_folders(Path(args.model_dir).expanduser())
    return choose_backend(folders) if folders else "onnxruntime"  # no graphs: loading says what is missing


def provider_names(flags: list[str] | None) -> list[str] | None:
    """--provider values -> onnxruntime's provider names: cpu, cuda and tensorrt expand to their chain (tensorrt,
    then cuda, then the CPU), full names pass as they are."""
    from diffship.runtimes.onnxruntime import PROVIDERS

    if not flags:
        return None
    names = [n for flag in flags for n in PROVIDERS.get(flag.lower(), [flag])]
    return list(dict.fromkeys(names))


def check_gpu_backend(backend: str | None, providers: list[str] | None) -> None:
    """What a GPU path needs, before anything is loaded: onnxruntime-gpu's providers, or TensorRT, CUDA's binding
    and a GPU (one-line errors naming the pip command)."""
    if backend == "onnxruntime" and providers:
        from diffship.runtimes.onnxruntime import check_providers

        check_providers(provider_names(providers))
    elif backend == "tensorrt":
        from diffship.runtimes.engines import check_tensorrt

        check_tensorrt()


def _check_generate(args) -> None:
    """Every flag of `generate` whose check needs no model, before anything is read or loaded. The checks that need
    the model (--steps past the scheduler's num_train_timesteps, --clip-skip past the text encoder's layers, sizes
    the VAE's scale factor does not divide) are the pipeline's, made before its first graph runs."""
    from diffship.pipelines.lora import parse_lora_flag
    from diffship.pipelines.steps import check_strength
    from diffship.pipelines.textual_inversion import parse_textual_inversion_flag

    backend = args.backend = _generate_backend(args)
    if args.provider and backend != "onnxruntime":
        raise ValueError(f"--provider chooses onnxruntime execution providers; --backend is {backend}")
    if args.inference_precision not in ("auto", "f32") and backend != "openvino":
        raise ValueError(f"--inference-precision {args.inference_precision} is OpenVINO's; --backend {backend} "
                         "computes fp32 graphs in fp32")
    if args.device and backend != "openvino":
        raise ValueError(f"--device chooses an OpenVINO device; --backend is {backend} (use --provider for "
                         "onnxruntime)")
    if args.static and backend != "openvino":
        raise ValueError(f"--static reshapes OpenVINO graphs; --backend is {backend}")
    check_gpu_backend(backend, args.provider)
    negatives = len(args.negative_prompt or [])
    if negatives not in (0, 1, len(args.prompt)):
        raise ValueError(f"--negative-prompt is given {negatives} times for {len(args.prompt)} --prompt: give it "
                         "once for every prompt, or once per prompt")
    if args.steps is not None:
        check_int(args.steps, "--steps", 1)
    if args.guidance is not None:
        check_number(args.guidance, "--guidance")
    if args.seed is not None:
        check_int(args.seed, "--seed", 0, MAX_SEED)
    check_image_size({"--height": args.height, "--width": args.width})
    check_int(args.num_images, "--num-images", 1)
    check_number(args.eta, "--eta", 0.0, 1.0)
    if args.clip_skip is not None:
        check_int(args.clip_skip, "--clip-skip", 0)
    if args.scheduler:
        check_scheduler_name(args.scheduler, "--scheduler")
    if args.strength is not None:  # the step count too where given; the pipeline's default is checked once loaded
        check_strength(args.strength, args.steps, names=("--strength", "--steps"))
    _check_step_cache_flags(args)
    args.lora = [_adapter_file(*parse_lora_flag(text), "--lora") for text in args.lora or []]
    args.textual_inversion = [_adapter_file(*parse_textual_inversion_flag(text), "--textual-inversion")
                              for text in args.textual_inversion or []]
    paths = _image_paths(args.out, len(args.prompt) * args.num_images)
    for path in paths:
        check_output_file(path, "--out", image=True, overwrite=args.overwrite)
    if args.json is not None:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
        if args.json.absolute() in {p.absolute() for p in paths}:
            raise ValueError(f"--json {args.json} is also where --out writes an image; give another path")


def _dtype_flag(text: str) -> tuple[str, str]:
    """--dtype's value: DTYPE (every component) or COMPONENT=DTYPE."""
    component, _, dtype = text.rpartition("=")
    if dtype not in EXPORT_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: the dtype must be one of {', '.join(EXPORT_DTYPES)}")
    return component or "default", dtype


def _dtypes(values) -> str | dict[str, str]:
    """export()'s dtype from the --dtype flags: one dtype, or component -> dtype (the last flag for each wins)."""
    chosen = dict(values or [])
    return chosen.get("default", "fp32") if set(chosen) <= {"default"} else chosen


def _layer_list(text: str) -> list[int]:
    """--skip-guidance-layers' value: block indices separated by commas."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of block indices such as 7,8,9") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: block indices start at 0")
    return layers


def _adapter_file(path: str, value, flag: str) -> tuple[Path, object]:
    """A run-time adapter flag's file, checked before anything loads: a .safetensors file that can be read
    (pickled files are refused: they can only be baked in at export), and a LoRA's scale."""
    from diffship.adapter_files import RUN_TIME_PICKLE_ADVICE, check_adapter_file

    file = check_adapter_file(Path(path).expanduser(), False, flag,
                              "LoRA" if flag == "--lora" else "embedding", RUN_TIME_PICKLE_ADVICE)
    if flag == "--lora":
        check_number(value, f"{flag} {path}: SCALE")
    return file, value


def _generate_task(args):
    """The AutoPipeline class for the inputs given, and the task's own call arguments."""
    from diffship.pipelines import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    for flag, value in (("--mask", args.mask), ("--depth-map", args.depth_map), ("--strength", args.strength)):
        if value is not None and args.image is None:
            raise ValueError(f"{flag} needs --image, the input picture")
    if args.mask is not None and args.depth_map is not None:
        raise ValueError("--depth-map is for depth-to-image; it does not go with --mask (inpainting)")
    if args.controlnet_scale is not None and not args.control_image:
        raise ValueError("--controlnet-scale needs --control-image, the ControlNet's conditioning image")
    control = {}
    if args.control_image:
        images = [_read_image(path, "--control-image") for path in args.control_image]
        control["image" if args.image is None else "control_image"] = images[0] if len(images) == 1 else images
        if args.controlnet_scale:
            scales = args.controlnet_scale
            control["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    if args.image is None:
        return AutoPipelineForText2Image, {"height": args.height, "width": args.width, **control}
    if args.static:
        raise ValueError("--static reshapes for text-to-image only; leave it out with --image")
    if args.mask is None and (args.height or args.width):
        raise ValueError("image-to-image takes its size from --image; leave out --height/--width")
    kwargs = {"image": _read_image(args.image, "--image"), **control}
    if args.strength is not None:
        kwargs["strength"] = args.strength
    if args.mask is not None:
        kwargs.update(mask_image=_read_image(args.mask, "--mask"), height=args.height, width=args.width)
        return AutoPipelineForInpainting, kwargs
    if max(kwargs["image"].size) > MAX_IMAGE_SIDE:
        width, height = kwargs["image"].size
        raise ValueError(f"--image {args.image} is {width}x{height} pixels; image-to-image runs at the image's size, "
                         f"at most {MAX_IMAGE_SIDE} a side: resize it first")
    if args.depth_map is not None:
        kwargs["depth_map"] = _read_image(args.depth_map, "--depth-map")
    return AutoPipelineForImage2Image, kwargs


def cmd_generate(args) -> None:
    from diffship.pipelines.steps import check_strength
    from diffship.pipelines.timing import format_timings
    from diffship.schedulers import scheduler_by_name

    _check_generate(args)
    options = {}
    if args.provider:
        options["providers"] = provider_names(args.provider)
    if args.device:
        options["device"] = args.device
    auto_pipeline, task_kwargs = _generate_task(args)
    pipe = auto_pipeline.from_pretrained(args.model_dir, backend=args.backend, **_hub_kwargs(args),
                                         inference_precision=args.inference_precision, **options)
    controlnets = len(getattr(pipe, "controlnets", []))
    if controlnets and not args.control_image:
        raise ValueError(f"{args.model_dir} has {controlnets} ControlNet(s): give --control-image, one per ControlNet")
    if args.control_image and not controlnets:
        raise ValueError(f"--control-image needs an export with ControlNets (diffship export ... --controlnet MODEL); "
                         f"{args.model_dir} has none")
    if controlnets and args.cache:
        raise ValueError("--cache: step caches do not run with ControlNets")
    if "depth_map" in task_kwargs and not hasattr(pipe, "estimate_depth"):
        raise ValueError(f"--depth-map needs a depth-to-image model; {args.model_dir} runs {type(pipe).__name__}")
    if args.scheduler:
        try:  # a scheduler of the other kind (flow matching vs noise prediction) is refused by the pipeline
            pipe.scheduler = scheduler_by_name(args.scheduler, pipe.scheduler.config)
        except DiffshipError as e:
            raise DiffshipError(f"--scheduler: {e}") from None
    for i, (file, _) in enumerate(args.lora):
        pipe.load_lora_weights(str(file), adapter_name=f"lora_{i}")
    if args.lora:
        pipe.set_adapters([f"lora_{i}" for i in range(len(args.lora))], [scale for _, scale in args.lora])
    for file, token in args.textual_inversion:
        pipe.load_textual_inversion(str(file), token=token)
    # The checks that need the model, under the flags' names (the pipeline makes them again, under its own);
    # --steps and --guidance default to the pipeline's own defaults (diffusers': SD3's differ from SD's).
    defaults = inspect.signature(pipe.__call__).parameters
    args.steps = defaults["num_inference_steps"].default if args.steps is None else args.steps
    args.guidance = defaults["guidance_scale"].default if args.guidance is None else args.guidance
    check_int(args.steps, "--steps", 1, pipe.scheduler.config.get("num_train_timesteps"))
    if args.strength is not None:
        check_strength(args.strength, args.steps, names=("--strength", "--steps"))
    pipe.check_clip_skip(args.clip_skip, "--clip-skip")
    pipe.set_progress_bar_config(disable=args.no_progress)
    if args.static:
        pipe.reshape(len(args.prompt), args.height, args.width, args.num_images, guidance=args.guidance > 1)
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    negative = None
    if args.negative_prompt:
        # One negative prompt for every prompt, or one per prompt (checked above); the pipeline takes prompt's type.
        negatives = args.negative_prompt * (len(args.prompt) // len(args.negative_prompt))
        negative = negatives[0] if isinstance(prompt, str) else negatives
    # eta (DDIM's) is an option of the UNet families' pipelines, the step caches not of the ControlNet ones,
    # skip-layer guidance SD3's,
    # clip_skip not Flux's, a negative prompt not FluxFillPipeline's: a flag given for a pipeline without the option
    # is refused rather than ignored.
    extra = {"eta": args.eta, "cache": args.cache, "cache_interval": args.cache_interval,
             "cache_start": args.cache_start, "skip_guidance_layers": args.skip_guidance_layers,
             "clip_skip": args.clip_skip, "negative_prompt": negative}
    accepted = inspect.signature(pipe.__call__).parameters
    given = [flag for flag, name, value in (("--eta", "eta", args.eta), ("--cache", "cache", args.cache),
                                            ("--skip-guidance-layers", "skip_guidance_layers",
                                             args.skip_guidance_layers),
                                            ("--negative-prompt", "negative_prompt", negative is not None))
             if value and name not in accepted]
    if given:
        raise ValueError(f"{', '.join(given)}: {type(pipe).__name__} takes no such option")
    result = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.num_images, generator=args.seed,
                  **{k: v for k, v in extra.items() if k in accepted}, **task_kwargs)
    paths = _image_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, exif=software_exif())  # marked as diffship's: a later run may replace it
        if args.show:
            from diffship.terminal_image import terminal_image

            print(terminal_image(image))
    print(f"saved {', '.join(str(p) for p in paths)}  ({type(pipe).__name__}, {pipe.backend}, "
          f"{type(pipe.scheduler).__name__}, {args.steps} steps)")
    print(format_timings(result.timings, "UNet" if pipe.denoiser == UNET else pipe.denoiser))
    print("inference precision: " + ", ".join(f"{name} {precision}"
                                              for name, precision in pipe.inference_precisions.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.timings, indent=2) + "\n")


def cmd_inspect(args) -> None:
    from diffship.graphs.inspect import format_inspection, inspect_path

    result = inspect_path(args.path)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))


# bench()'s arguments -> the flags that set them, for errors.
BENCH_FLAGS = {"runs": "--runs", "warmup": "--warmup", "steps": "--steps", "batch_size": "--batch-size",
               "height": "--height", "width": "--width", "guidance_scale": "--guidance", "task": "--task",
               "strength": "--strength", "seed": "--seed", "static": "--static", "scheduler": "--scheduler"}


def _check_bench(args, backends: list[str] | None) -> None:
    """Every flag of `bench`, before any worker starts."""
    from diffship.benchmarking import check_backend, check_bench_arguments

    with _flag("--backend"):
        canonical = {check_backend(b) for b in backends or []}
    if backends is not None and "openvino" not in canonical:
        for flag, value in (("--static", args.static and "tensorrt" not in canonical),
                            ("--inference-precision", args.inference_precision)):
            if value:
                raise ValueError(f"{flag} is an OpenVINO setting; --backend {','.join(backends)} has no openvino")
    if args.provider is not None:
        if backends is not None and "onnxruntime" not in canonical:
            raise ValueError(f"--provider is onnxruntime's; --backend {','.join(backends)} has no onnxruntime")
        check_gpu_backend("onnxruntime", [args.provider])
    if args.strength is not None and args.task != "image-to-image":
        raise ValueError("--strength is for --task image-to-image")
    check_bench_arguments(BENCH_FLAGS, runs=args.runs, warmup=args.warmup, steps=args.steps,
                          batch_size=args.batch_size, height=args.height, width=args.width,
                          guidance_scale=args.guidance, task=args.task, strength=args.strength, seed=args.seed,
                          static=args.static, scheduler=args.scheduler)
    for flag, path, image in (("--json", args.json, False), ("--markdown", args.markdown, False),
                              ("--plot", args.plot, True)):
        if path is not None:
            check_output_file(path, flag, image=image, overwrite=args.overwrite)


def _check_step_cache_flags(args) -> None:
    if args.cache_interval is not None:
        check_int(args.cache_interval, "--cache-interval", 1)
    if args.cache_start is not None:
        check_int(args.cache_start, "--cache-start", 0)


def _step_cache_kwargs(args) -> dict:
    _check_step_cache_flags(args)
    if args.cache is None:
        return {}
    return {"cache": args.cache, "cache_interval": args.cache_interval, "cache_start": args.cache_start}


def _bench_model_dir(args, backends: list[str] | None) -> Path:
    """The exported directory to bench: a hub repo id is downloaded for each --backend (without it, for the one its
    graphs are for)."""
    from diffship.hub import HubOptions, exported_pipeline

    options = HubOptions(**_hub_kwargs(args))
    for backend in backends or [None]:
        model_dir, _ = exported_pipeline(args.model_dir, backend, options)
    return model_dir


def cmd_bench(args) -> None:
    from diffship.benchmarking import bench, write_outputs
    from diffship.benchmarking.report import format_table, settings_line

    backends = [b.strip() for flag in args.backend or [] for b in flag.split(",") if b.strip()] or None
    _check_bench(args, backends)
    model_dir = _bench_model_dir(args, backends)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    strength = {} if args.strength is None else {"strength": args.strength}
    report = bench(model_dir, backends, height=args.height, width=args.width, steps=args.steps,
                   batch_size=args.batch_size, runs=args.runs, warmup=args.warmup, static=args.static,
                   prompt=args.prompt, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
                   guidance_scale=args.guidance, task=args.task, seed=args.seed,
                   inference_precision=args.inference_precision, roofline=args.roofline, log=log,
                   call_kwargs=_step_cache_kwargs(args), provider=args.provider, **strength)
    print(settings_line(report))
    print(format_table(report))
    write_outputs(report, args.json, args.markdown, args.plot)
    if all(r.get("error") for r in report["results"]):
        raise DiffshipError("every backend failed; see the errors above")


# serve's options -> the flags that set them, for errors.
SERVE_FLAGS = {"model_dir": "DIR", "max_batch_size": "--max-batch-size", "batch_wait_ms": "--batch-wait-ms",
               "max_queued_requests": "--max-queued-requests", "request_timeout_s": "--request-timeout"}


def cmd_serve(args) -> None:
    from diffship.serving import _app_module
    from diffship.serving.options import ServeOptions, check_model_dir, check_options, local_cpus, parse_autoscale

    def name(argument: str) -> str:
        return SERVE_FLAGS.get(argument, "--" + argument.replace("_", "-"))

    autoscale = None if args.autoscale is None else parse_autoscale(args.autoscale)
    options = ServeOptions(model_dir=args.model_dir, backend=args.backend, replicas=args.replicas,
                           autoscale=autoscale, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                           threads=args.threads, max_queued_requests=args.max_queued_requests,
                           request_timeout_s=args.request_timeout, host=args.host, port=args.port,
                           address=args.address)
    check_options(options, name, local_cpus=None if args.address else local_cpus())
    options.backend = check_model_dir(options.model_dir, options.backend, name)
    _app_module().run_until_stopped(options)


COMMANDS = {"tiny-model": cmd_tiny_model, "export": cmd_export, "generate": cmd_generate, "inspect": cmd_inspect,
            "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (DiffshipError, ValueError, TypeError) as e:  # bad input: arguments, files, models
        return _fail(args.command, str(e), 2)
    except OSError as e:  # the machine's refusal: permissions, a full disk, a vanished file
        return _fail(args.command, str(e), 1)
    except MemoryError as e:
        return _fail(args.command, f"out of memory ({e or 'an allocation failed'}); try smaller images, fewer at "
                                   "once, or a machine with more memory", 1)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during an export (which cleans up first)
        signum = getattr(e, "signum", signal.SIGINT)
        return _fail(args.command, str(e) or "interrupted", 128 + signum)
    return 0


def _fail(command: str, message: str, code: int) -> int:
    """One line on stderr (messages from backends span lines), and the exit code."""
    print(f"diffship {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
