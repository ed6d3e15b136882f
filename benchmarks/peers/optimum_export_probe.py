"""Probe what Hugging Face Optimum writes when it exports a Stable Diffusion 1.x pipeline, and how its ORT/OV pipelines
load and run such a directory.

Runs inside the peer venv made by `benchmarks/peers/setup_optimum_venv.sh` (torch, diffusers, optimum-onnx,
optimum-intel), never in diffship's own venv:

    .venv-optimum/bin/python benchmarks/peers/optimum_export_probe.py [--out out/optimum_probe]

It builds a tiny SD 1.x pipeline in code (no download), exports it four ways (optimum-cli onnx / openvino, and
ORTStableDiffusionPipeline / OVStableDiffusionPipeline `from_pretrained(export=True)` + save_pretrained), describes every
export (files, model_index.json, component configs, graph inputs/outputs with dtypes and symbolic dims), generates with
Optimum's ORT and OV pipelines (2 steps, 64x64) while recording what they feed each graph, compares with diffusers
(torch), and tries a few ablations of the directory (what a foreign-exported directory must contain to load).
Results: OUT/report.json (everything) and OUT/report.md (the summary, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything is built in code
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

PROMPT = "a photo of an astronaut riding a horse on mars"
COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


# --------------------------------------------------------------------------------------------------------------------
# the tiny SD 1.x pipeline
# --------------------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode char table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_bpe(folder: Path, num_merges: int = 120) -> dict:
    """A small valid CLIP BPE vocabulary: 256 byte chars, their '</w>' forms, merges learnt from a tiny corpus, and
    the two special tokens last (as in CLIP). Returns ids of the special tokens."""
    corpus = (
        "a photo of an astronaut riding a horse on mars . a painting of a cat sitting on the moon , "
        "the quick brown fox jumps over the lazy dog . high quality , detailed , 4k , photograph of a red car "
        "in the city at night with lights"
    ).split()
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    words: dict[tuple[str, ...], int] = {}
    for w in corpus:
        chars = tuple(bytes_to_unicode()[b] for b in w.encode("utf-8"))
        key = chars[:-1] + (chars[-1] + "</w>",)
        words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_words = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + freq
        words = new_words
        if merged not in vocab:
            vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    # CLIPTokenizer skips the first line of merges.txt (the '#version' header)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return {"vocab_size": len(vocab), "bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1, "merges": len(merges)}


def build_tiny_sd(out_dir: Path) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bpe_dir = out_dir.parent / "tiny_clip_bpe"
    bpe = write_tiny_clip_bpe(bpe_dir)
    tokenizer = CLIPTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"), model_max_length=77)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=1000,
            layer_norm_eps=1e-5,
            max_position_embeddings=77,
            bos_token_id=bpe["bos_token_id"],
            eos_token_id=bpe["eos_token_id"],
            pad_token_id=bpe["eos_token_id"],
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        skip_prk_steps=True,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    ids = tokenizer(PROMPT).input_ids
    return {"bpe": bpe, "prompt_ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)}


# --------------------------------------------------------------------------------------------------------------------
# exports
# --------------------------------------------------------------------------------------------------------------------


def run_cli(args: list[str], log: Path) -> dict:
    cli = Path(sys.executable).with_name("optimum-cli")
    t0 = time.perf_counter()
    proc = subprocess.run([str(cli), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    return {
        "command": " ".join(["optimum-cli", *args]),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "log": str(log),
        "log_tail": proc.stdout.strip().splitlines()[-8:],
    }


def api_export(kind: str, model_dir: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    if kind == "ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline as cls
    else:
        from optimum.intel import OVStableDiffusionPipeline as cls
    pipe = cls.from_pretrained(str(model_dir), export=True)
    pipe.save_pretrained(str(out))
    return {"call": f"{cls.__name__}.from_pretrained(DIR, export=True).save_pretrained(OUT)", "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------------------------------
# inspection
# --------------------------------------------------------------------------------------------------------------------


def tree(root: Path) -> list[str]:
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rows.append(f"{p.relative_to(root)}  ({p.stat().st_size} B)")
    return rows


def onnx_io(path: Path) -> dict:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims}

    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}",
        "inputs": [describe(v) for v in model.graph.input],
        "outputs": [describe(v) for v in model.graph.output],
        "metadata_props": {p.key: p.value for p in model.metadata_props},
    }


def ov_io(path: Path) -> dict:
    import openvino as ov

    with contextlib.suppress(ImportError):
        import openvino_tokenizers  # noqa: F401  (registers the extension ops of tokenizer/openvino_*tokenizer.xml)
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        return {"inputs": [], "outputs": [], "error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    def describe(port):
        return {
            "name": port.get_any_name(),
            "names": sorted(port.get_names()),
            "dtype": str(port.get_element_type().get_type_name()),
            "shape": str(port.get_partial_shape()),
        }

    rt = {}
    with contextlib.suppress(Exception):
        rt = _rt_info_to_dict(model.get_rt_info())
    return {"inputs": [describe(p) for p in model.inputs], "outputs": [describe(p) for p in model.outputs], "rt_info": rt}


def _rt_info_to_dict(rt) -> dict:
    out = {}
    for key in rt:
        val = rt[key]
        try:
            inner = val.astype(dict) if hasattr(val, "astype") else val
        except Exception:
            inner = val
        if hasattr(val, "value") and not isinstance(inner, dict):
            with contextlib.suppress(Exception):
                inner = val.value
        if isinstance(inner, dict) or type(inner).__name__ == "RTMap":
            with contextlib.suppress(Exception):
                out[key] = _rt_info_to_dict(inner)
                continue
        out[key] = str(inner)
    return out


def describe_export(root: Path, fmt: str) -> dict:
    info: dict = {"root": str(root), "files": tree(root)}
    mi = root / "model_index.json"
    info["model_index.json"] = json.loads(mi.read_text()) if mi.is_file() else None
    info["configs"] = {}
    info["graphs"] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for cfg_name in ("config.json", "scheduler_config.json", "tokenizer_config.json", "openvino_config.json"):
            cfg = sub / cfg_name
            if cfg.is_file():
                info["configs"][f"{sub.name}/{cfg_name}"] = json.loads(cfg.read_text())
        if fmt == "onnx" and (sub / "model.onnx").is_file():
            info["graphs"][sub.name] = onnx_io(sub / "model.onnx")
        if fmt == "openvino":
            for xml in sorted(sub.glob("*.xml")):
                info["graphs"][f"{sub.name}/{xml.name}" if xml.name != "openvino_model.xml" else sub.name] = ov_io(xml)
    for f in ("openvino_config.json",):
        if (root / f).is_file():
            info["configs"][f] = json.loads((root / f).read_text())
    return info


# --------------------------------------------------------------------------------------------------------------------
# generation with recording of what each graph is fed
# --------------------------------------------------------------------------------------------------------------------


def _desc(v) -> dict:
    if isinstance(v, torch.Tensor):
        d = {"type": "torch.Tensor", "dtype": str(v.dtype), "shape": list(v.shape)}
        if v.numel() <= 4:
            d["value"] = v.flatten().tolist()
        return d
    if isinstance(v, np.ndarray):
        d = {"type": "np.ndarray", "dtype": str(v.dtype), "shape": list(v.shape)}
        if v.size <= 4:
            d["value"] = v.flatten().tolist()
        return d
    if v is None:
        return {"type": "None"}
    return {"type": type(v).__name__}


class _OVRequestRecorder:
    def __init__(self, request, log: list, name: str):
        self._request, self._log, self._name = request, log, name

    def __call__(self, inputs, *args, **kwargs):
        self._log.append({"component": self._name, "fed_to_graph": {k if isinstance(k, str) else str(k): _desc(v) for k, v in inputs.items()}})
        return self._request(inputs, *args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._request, item)


def record_ort(pipe, log: list):
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        part = getattr(pipe, name, None)
        if part is None:
            continue
        run = part.session.run

        def rec_run(output_names, feeds, *a, _run=run, _name=name, **k):
            log.append({"component": _name, "fed_to_graph": {key: _desc(v) for key, v in feeds.items()}})
            return _run(output_names, feeds, *a, **k)

        part.session.run = rec_run
        fwd = part.forward

        def rec_fwd(*a, _fwd=fwd, _name=name, **k):
            log.append({"component": _name, "called_by_diffusers_with": {"args": [_desc(x) for x in a], "kwargs": {kk: _desc(vv) for kk, vv in k.items() if not isinstance(vv, (bool, dict))}}})
            return _fwd(*a, **k)

        part.forward = rec_fwd


def record_ov(pipe, log: list):
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        part = getattr(pipe, name, None)
        if part is None:
            continue
        part.compile()
        part.request = _OVRequestRecorder(part.request, log, name)
        fwd = part.forward

        def rec_fwd(*a, _fwd=fwd, _name=name, **k):
            log.append({"component": _name, "called_by_diffusers_with": {"args": [_desc(x) for x in a], "kwargs": {kk: _desc(vv) for kk, vv in k.items() if not isinstance(vv, (bool, dict))}}})
            return _fwd(*a, **k)

        part.forward = rec_fwd


def generate(pipe, steps: int = 2, size: int = 64) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images), time.perf_counter() - t0


def load_ort(path: Path, **kw):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    return ORTStableDiffusionPipeline.from_pretrained(str(path), **kw)


def load_ov(path: Path, **kw):
    from optimum.intel import OVStableDiffusionPipeline

    return OVStableDiffusionPipeline.from_pretrained(str(path), **kw)


def run_pipeline(kind: str, path: Path, reference: np.ndarray | None, record: bool = True, **kw) -> dict:
    res: dict = {"dir": str(path), "kind": kind}
    try:
        t0 = time.perf_counter()
        pipe = (load_ort if kind == "ort" else load_ov)(path, **kw)
        res["load_s"] = round(time.perf_counter() - t0, 2)
        pipe.set_progress_bar_config(disable=True)
        res["pipeline_class"] = type(pipe).__name__
        res["scheduler_class"] = type(pipe.scheduler).__name__
        res["tokenizer_class"] = type(pipe.tokenizer).__name__
        res["tokenizer_model_max_length"] = getattr(pipe.tokenizer, "model_max_length", None)
        res["vae_scale_factor"] = getattr(pipe, "vae_scale_factor", None)
        log: list = []
        if record:
            (record_ort if kind == "ort" else record_ov)(pipe, log)
        images, secs = generate(pipe)
        res["generate_s"] = round(secs, 2)
        res["image_shape"] = list(images.shape)
        if reference is not None:
            res["max_abs_diff_vs_diffusers"] = float(np.abs(images - reference).max())
        # keep one call per component and kind of record (they repeat every step)
        seen, calls = set(), []
        for entry in log:
            key = (entry["component"], "fed_to_graph" in entry)
            if key not in seen:
                seen.add(key)
                calls.append(entry)
        res["calls"] = calls
        res["ok"] = True
    except Exception as exc:  # the point of ablations is to see how they fail
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {exc}"[:600]
        res["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
    return res


# --------------------------------------------------------------------------------------------------------------------
# ablations: what must a foreign directory contain
# --------------------------------------------------------------------------------------------------------------------

# The config keys that the Optimum wrappers and diffusers' StableDiffusionPipeline read, per component.
MINIMAL_CONFIGS = {
    "text_encoder": ["num_hidden_layers"],
    "unet": ["in_channels", "sample_size", "time_cond_proj_dim"],
    "vae_decoder": ["block_out_channels", "latent_channels", "scaling_factor"],
    "vae_encoder": ["block_out_channels", "in_channels", "scaling_factor"],
}


def ablations(onnx_dir: Path, ov_dir: Path, work: Path, reference: np.ndarray) -> dict:
    results = {}

    def variant(src: Path, name: str, edit) -> Path:
        dst = work / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        edit(dst)
        return dst

    def drop(*rel):
        def edit(d: Path):
            for r in rel:
                p = d / r
                shutil.rmtree(p) if p.is_dir() else p.unlink()

        return edit

    def configs(keep: dict | None):
        def edit(d: Path):
            for comp in COMPONENTS:
                cfg = d / comp / "config.json"
                if cfg.is_file():
                    full = json.loads(cfg.read_text())
                    new = {} if keep is None else {k: full[k] for k in keep.get(comp, []) if k in full}
                    cfg.write_text(json.dumps(new, indent=2))

        return edit

    def tokenizer_only_bpe(d: Path):
        for p in (d / "tokenizer").iterdir():
            if p.name not in ("vocab.json", "merges.txt"):
                p.unlink()

    def model_index_minimal(d: Path):
        mi = json.loads((d / "model_index.json").read_text())
        keep = {k: v for k, v in mi.items() if k in ("_class_name", "scheduler", "tokenizer", "text_encoder", "unet", "vae")}
        (d / "model_index.json").write_text(json.dumps(keep, indent=2))

    cases = [
        ("no_vae_encoder", drop("vae_encoder")),
        ("no_text_encoder_config", drop("text_encoder/config.json")),
        ("empty_component_configs", configs(None)),
        ("minimal_component_configs", configs(MINIMAL_CONFIGS)),
        ("tokenizer_vocab_merges_only", tokenizer_only_bpe),
        ("model_index_minimal", model_index_minimal),
    ]
    for name, edit in cases:
        results[f"ort:{name}"] = run_pipeline("ort", variant(onnx_dir, f"onnx_{name}", edit), reference, record=False)
        results[f"ov:{name}"] = run_pipeline("ov", variant(ov_dir, f"ov_{name}", edit), reference, record=False)
    # leave one key out of the minimal configs: which keys are really read
    for comp, keys in MINIMAL_CONFIGS.items():
        for key in keys:
            keep = {c: [k for k in ks if not (c == comp and k == key)] for c, ks in MINIMAL_CONFIGS.items()}
            name = f"minimal_configs_without_{comp}.{key}"
            results[f"ort:{name}"] = run_pipeline("ort", variant(onnx_dir, f"onnx_{name}", configs(keep)), reference, record=False)
            results[f"ov:{name}"] = run_pipeline("ov", variant(ov_dir, f"ov_{name}", configs(keep)), reference, record=False)

    def tokenizer_min(d: Path):
        tokenizer_only_bpe(d)
        (d / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))

    def model_index_bare(d: Path):
        mi = json.loads((d / "model_index.json").read_text())
        (d / "model_index.json").write_text(json.dumps({k: mi[k] for k in ("scheduler", "tokenizer")}, indent=2))

    for name, edit in [("tokenizer_vocab_merges_plus_model_max_length", tokenizer_min), ("model_index_only_scheduler_tokenizer", model_index_bare)]:
        results[f"ort:{name}"] = run_pipeline("ort", variant(onnx_dir, f"onnx_{name}", edit), reference, record=False)
        results[f"ov:{name}"] = run_pipeline("ov", variant(ov_dir, f"ov_{name}", edit), reference, record=False)

    results["ov:load_onnx_dir(from_onnx=True)"] = run_pipeline("ov", onnx_dir, reference, record=True, from_onnx=True)

    # a foreign UNet whose timestep is int64 [batch] (older Optimum ONNX, Optimum's OpenVINO, diffship's other form)
    try:
        int_dir = variant(onnx_dir, "onnx_unet_timestep_int64_batch", lambda d: None)
        export_unet_int64_timestep(onnx_dir.parent / "tiny_sd", int_dir / "unet" / "model.onnx")
        results["unet_timestep_int64_batch:graph"] = {"ok": True, **onnx_io(int_dir / "unet" / "model.onnx")}
        results["ort:unet_timestep_int64_batch"] = run_pipeline("ort", int_dir, reference, record=True)
        import openvino as ov

        ov_int_dir = variant(ov_dir, "ov_unet_timestep_int64_batch", lambda d: None)
        ov.save_model(ov.convert_model(str(int_dir / "unet" / "model.onnx")), str(ov_int_dir / "unet" / "openvino_model.xml"), compress_to_fp16=False)
        results["ov:unet_timestep_int64_batch"] = run_pipeline("ov", ov_int_dir, reference, record=True)
        ov_f32_dir = variant(ov_dir, "ov_unet_timestep_float_scalar", lambda d: None)
        ov.save_model(ov.convert_model(str(onnx_dir / "unet" / "model.onnx")), str(ov_f32_dir / "unet" / "openvino_model.xml"), compress_to_fp16=False)
        results["ov:unet_timestep_float_scalar(from ORT export)"] = run_pipeline("ov", ov_f32_dir, reference, record=True)
    except Exception as exc:
        results["unet_timestep_int64_batch:graph"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    return results


def export_unet_int64_timestep(model_dir: Path, out: Path) -> None:
    """torch.onnx.export of the UNet with timestep int64 [batch_size] (as diffship may write it)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    sample = torch.randn(2, 4, 32, 32)
    timestep = torch.tensor([999, 999], dtype=torch.int64)
    ehs = torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.onnx.export(
            Wrapper(unet), (sample, timestep, ehs), str(out), dynamo=False, opset_version=17,
            input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
            dynamic_axes={"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
                          "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                          "out_sample": {0: "batch_size", 2: "height", 3: "width"}},
        )


def component_semantics(model_dir: Path, onnx_dir: Path) -> dict:
    """What the exported text encoder / VAE graphs compute, checked against the torch modules."""
    import onnxruntime as ort
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    res = {}
    sess = lambda comp: ort.InferenceSession(str(onnx_dir / comp / "model.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        params = dist.parameters.numpy()
        mean = dist.mean.numpy()
    (lp,) = sess("vae_encoder").run(None, {"sample": x.numpy()})
    sf = vae.config.scaling_factor
    res["vae_encoder"] = {
        "latent_parameters_shape": list(lp.shape),
        "max|latent_parameters - torch latent_dist.parameters (mean||logvar, unscaled)|": float(np.abs(lp - params).max()),
        "max|first half - torch mean|": float(np.abs(lp[:, :4] - mean).max()),
        "max|first half - torch mean * scaling_factor|": float(np.abs(lp[:, :4] - mean * sf).max()),
        "logvar_clamped_in_graph(-30..20)": bool(lp[:, 4:].min() >= -30 and lp[:, 4:].max() <= 20),
    }
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        dec = vae.decode(z).sample.numpy()
        dec_scaled = vae.decode(z / sf).sample.numpy()
    (img,) = sess("vae_decoder").run(None, {"latent_sample": z.numpy()})
    res["vae_decoder"] = {
        "max|sample - torch vae.decode(z)|": float(np.abs(img - dec).max()),
        "max|sample - torch vae.decode(z / scaling_factor)|": float(np.abs(img - dec_scaled).max()),
        "output_range": [float(img.min()), float(img.max())],
    }
    te = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).eval()
    ids = torch.randint(0, 600, (2, 77))
    with torch.no_grad():
        ref = te(ids, output_hidden_states=True)
    outs = sess("text_encoder").run(None, {"input_ids": ids.numpy()})
    res["text_encoder"] = {
        "max|last_hidden_state - torch last_hidden_state (after final_layer_norm)|": float(np.abs(outs[0] - ref.last_hidden_state.numpy()).max()),
        "max|pooler_output - torch pooler_output|": float(np.abs(outs[1] - ref.pooler_output.numpy()).max()),
    }
    return res


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


def fmt_io(entries: list[dict]) -> str:
    return "; ".join(f"{e['name']} {e['dtype']} {e['shape']}" for e in entries)


CONFIG_HIGHLIGHTS = [
    "_class_name", "_diffusers_version", "architectures", "model_type", "transformers_version", "num_hidden_layers",
    "hidden_size", "projection_dim", "output_hidden_states", "in_channels", "out_channels", "sample_size",
    "cross_attention_dim", "time_cond_proj_dim", "latent_channels", "block_out_channels", "scaling_factor",
    "force_upcast", "model_max_length", "_name_or_path",
]


def write_markdown(report: dict, path: Path) -> str:
    lines = ["# Optimum export probe", "", f"versions: {report['versions']}", ""]
    for key, exp in report["exports"].items():
        lines += [f"## {key}", "", f"made by: {exp['made_by']}", "", "files:", ""]
        lines += [f"    {f}" for f in exp["files"]]
        lines += ["", "model_index.json:", "", "    " + json.dumps(exp["model_index.json"]), "", "configs (keys; highlighted values):", ""]
        for cfg_name, cfg in exp["configs"].items():
            hl = {k: cfg[k] for k in CONFIG_HIGHLIGHTS if k in cfg}
            lines.append(f"- {cfg_name}: {len(cfg)} keys {sorted(cfg)}; {json.dumps(hl)}")
        lines += ["", "graphs:", ""]
        for g, io_ in exp["graphs"].items():
            lines.append(f"- {g}: in [{fmt_io(io_['inputs'])}] -> out [{fmt_io(io_['outputs'])}]")
            if io_.get("rt_info"):
                lines.append(f"  rt_info: {json.dumps(io_['rt_info'])[:600]}")
        lines.append("")
    lines += ["## generation (2 steps, 64x64)", ""]
    for key, r in report["generation"].items():
        lines.append(f"- {key}: ok={r['ok']} load {r.get('load_s')} s, generate {r.get('generate_s')} s, "
                     f"max|diff| vs diffusers {r.get('max_abs_diff_vs_diffusers')}, error {r.get('error')}")
        for c in r.get("calls", []):
            lines.append(f"    {json.dumps(c)}")
    lines += ["", f"OpenVINO CPU default INFERENCE_PRECISION_HINT here: {report.get('openvino_cpu_default_inference_precision')}", ""]
    lines += ["## component semantics (ONNX export vs torch)", ""]
    for comp, facts in report.get("component_semantics", {}).items():
        lines.append(f"- {comp}: {json.dumps(facts)}")
    lines += ["", "## ablations (foreign directory requirements)", ""]
    for key, r in report["ablations"].items():
        if key.endswith(":graph"):
            lines.append(f"- {key}: " + (f"in [{fmt_io(r['inputs'])}] -> out [{fmt_io(r['outputs'])}]" if r["ok"] else f"error: {r.get('error')}"))
            continue
        lines.append(f"- {key}: ok={r['ok']}" + (f" max|diff| {r.get('max_abs_diff_vs_diffusers')}" if r["ok"] else f" error: {r.get('error')}"))
        for c in r.get("calls", []):
            if c["component"] == "unet":
                lines.append(f"    {json.dumps(c)}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "out" / "optimum_probe"))
    ap.add_argument("--skip-ablations", action="store_true")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(2)

    from importlib.metadata import version

    report: dict = {
        "versions": {n: version(n) for n in ["optimum", "optimum-onnx", "optimum-intel", "onnxruntime", "openvino", "openvino-tokenizers", "onnx", "diffusers", "transformers", "tokenizers", "torch"]},
        "timings_s": {},
    }
    t0 = time.perf_counter()
    tiny = out / "tiny_sd"
    report["tiny_sd"] = build_tiny_sd(tiny)
    report["tiny_sd"]["files"] = tree(tiny)
    report["timings_s"]["build_tiny_sd"] = round(time.perf_counter() - t0, 1)

    # diffusers (torch) reference image
    from diffusers import StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    ref_pipe.set_progress_bar_config(disable=True)
    reference, secs = generate(ref_pipe)
    report["timings_s"]["diffusers_generate"] = round(secs, 2)
    del ref_pipe

    exports = {
        "onnx_cli": ("onnx", lambda p: run_cli(["export", "onnx", "--model", str(tiny), "--task", "text-to-image", str(p)], out / "onnx_cli.log")),
        "openvino_cli": ("openvino", lambda p: run_cli(["export", "openvino", "--model", str(tiny), "--task", "text-to-image", "--weight-format", "fp32", str(p)], out / "openvino_cli.log")),
        "onnx_api": ("onnx", lambda p: api_export("ort", tiny, p)),
        "openvino_api": ("openvino", lambda p: api_export("ov", tiny, p)),
    }
    report["exports"] = {}
    for key, (fmt, make) in exports.items():
        path = out / key
        try:
            made = make(path)
        except Exception as exc:
            made = {"error": f"{type(exc).__name__}: {exc}"}
        report["timings_s"][f"export_{key}"] = made.get("seconds")
        desc = describe_export(path, fmt) if path.is_dir() else {"files": [], "model_index.json": None, "configs": {}, "graphs": {}}
        desc["made_by"] = made
        report["exports"][key] = desc

    report["generation"] = {
        "ort<-onnx_cli": run_pipeline("ort", out / "onnx_cli", reference),
        "ov<-openvino_cli": run_pipeline("ov", out / "openvino_cli", reference),
        "ort<-onnx_api": run_pipeline("ort", out / "onnx_api", reference, record=False),
        "ov<-openvino_api": run_pipeline("ov", out / "openvino_api", reference, record=False),
    }
    import openvino as ov

    report["openvino_cpu_default_inference_precision"] = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    report["generation"]["ov<-openvino_cli ov_config INFERENCE_PRECISION_HINT=f32"] = run_pipeline(
        "ov", out / "openvino_cli", reference, record=False, ov_config={"INFERENCE_PRECISION_HINT": "f32"}
    )
    report["component_semantics"] = component_semantics(tiny, out / "onnx_cli")
    report["ablations"] = {} if args.skip_ablations else ablations(out / "onnx_cli", out / "openvino_cli", out / "ablations", reference)
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 1)

    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(write_markdown(report, out / "report.md"))
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
