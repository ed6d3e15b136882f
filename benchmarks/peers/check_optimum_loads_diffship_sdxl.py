"""The reverse interop check for SDXL: does a diffship SDXL export load in Optimum's ORT and OpenVINO SDXL pipelines
and give diffusers' images? The SDXL counterpart of check_optimum_loads_diffship.py (SD 1.x). Runs in the Optimum
venv (benchmarks/peers/setup_optimum_venv.sh):

    .venv-optimum/bin/python benchmarks/peers/check_optimum_loads_diffship_sdxl.py --export DIFFSHIP_EXPORT \
        --source TINY_SDXL [--work DIR] [--out benchmarks/results/optimum_loads_diffship_sdxl]

DIFFSHIP_EXPORT is `diffship export TINY_SDXL DIFFSHIP_EXPORT --backend onnx,openvino` of `diffship tiny-model
TINY_SDXL --kind sdxl` (each component folder holds model.onnx and openvino_model.xml side by side); TINY_SDXL is
the diffusers source, its text encoders in the Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout) so that
this venv's transformers 4.x reads them; the script checks that it does.

What is compared: diffusers' StableDiffusionXLPipeline (torch, add_watermarker=False) on TINY_SDXL, and
optimum.onnxruntime.ORTStableDiffusionXLPipeline.from_pretrained(DIFFSHIP_EXPORT) and
optimum.intel.OVStableDiffusionXLPipeline.from_pretrained(DIFFSHIP_EXPORT, ov_config={"INFERENCE_PRECISION_HINT":
"f32"}), with the same prompts (a batch of 2), latents (a fixed array), scheduler (the export's, diffusers' class on
every side), 64x64, 3 steps, guidance 5.0 (SDXL's default) and 1.0, output_type="np": the max abs difference of the
images in [0, 1], against the bound 1e-3. If a pipeline fails to load the combined directory, the error is recorded
and it is retried on a copy (symlinks) holding only that runtime's graph files.

Where the pipeline called with the prompts fails, the run records the exception and the innermost frame of its
traceback, and a diagnostic run follows: the same pipeline called with prompt_embeds / pooled_prompt_embeds that
this script computes from the loaded pipeline's own text-encoder graphs, picking their outputs by name
(hidden_states.<n-2> of both encoders, text_embeds of text_encoder_2) instead of by position, with everything else
(UNet, scheduler, VAE) Optimum's. That tells whether the failure is in the text-encoder hand-off only. The diagnostic
is not a fix of the export and does not count as a pass.

Writes OUT.json (everything) and OUT.md (the summary, also printed). Exit status 1 if a pipeline failed to load,
a run with the prompts failed, or a difference exceeds the bound. Light: one process, 1 thread per runtime.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 3
SIZE = 64
GUIDANCE = (5.0, 1.0)
THREADS = 1
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
VERSIONS = ["optimum", "optimum-onnx", "optimum-intel", "onnxruntime", "openvino", "diffusers", "transformers",
            "torch", "numpy"]
FORMAT_FILES = {"onnx": ("model.onnx", "model.onnx_data"), "openvino": ("openvino_model.xml", "openvino_model.bin")}
PIPELINES = {"ort": "optimum.onnxruntime.ORTStableDiffusionXLPipeline",
             "ov": "optimum.intel.OVStableDiffusionXLPipeline"}


def latents() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((len(PROMPTS), 4, SIZE // 8, SIZE // 8))
                            .astype(np.float32))


def call(pipe, guidance_scale: float, **prompt) -> np.ndarray:
    out = pipe(**prompt, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
               latents=latents(), output_type="np")
    return np.asarray(out.images)


def error_record(exc: BaseException) -> dict:
    """The exception, the innermost frame (the key line) and the last frames of the traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    inner = frames[-1]
    where = inner.filename.split("site-packages/")[-1]
    return {
        "error": f"{type(exc).__name__}: {exc}"[:800],
        "key_line": f"{where}:{inner.lineno} in {inner.name}: {inner.line}",
        "frames": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} in {f.name}: {f.line}"
                   for f in frames[-4:]],
    }


# --- what the graphs declare ------------------------------------------------------------------------------------------

def graph_io(export: Path) -> dict:
    import onnx
    import openvino as ov

    types = {v: k.lower() for k, v in vars(onnx.TensorProto).items() if isinstance(v, int) and k.isupper()}

    def dims(t):
        return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]

    core = ov.Core()
    out = {}
    for comp in COMPONENTS:
        g = onnx.load(str(export / comp / "model.onnx"), load_external_data=False).graph
        m = core.read_model(str(export / comp / "openvino_model.xml"))
        out[comp] = {
            "onnx_inputs": [f"{t.name}: {types[t.type.tensor_type.elem_type]} {dims(t)}" for t in g.input],
            "onnx_outputs": [t.name for t in g.output],
            "openvino_inputs": [f"{p.get_any_name()}: {p.get_element_type().get_type_name()} {p.get_partial_shape()}"
                                for p in m.inputs],
            "openvino_outputs": [p.get_any_name() for p in m.outputs],
        }
    return out


def source_text_encoders_load(source: Path) -> dict:
    """transformers 4.x must read every text-encoder weight of the source (else the oracle is a random model)."""
    import transformers

    out = {}
    for comp in ("text_encoder", "text_encoder_2"):
        cfg = json.loads((source / comp / "config.json").read_text())
        cls = getattr(transformers, cfg["architectures"][0])
        _, info = cls.from_pretrained(str(source / comp), output_loading_info=True)
        bad = {k: list(v) for k, v in info.items() if v}
        if bad:
            out[comp] = bad
    return out


# --- loading ------------------------------------------------------------------------------------------------------------

def single_format_copy(export: Path, fmt: str, work: Path) -> Path:
    """A copy of the export (symlinks) without the other runtime's graph files."""
    other = FORMAT_FILES["openvino" if fmt == "onnx" else "onnx"]
    dst = work / f"diffship-sdxl-{fmt}-only"
    for src in export.rglob("*"):
        if src.is_file() and src.name not in other:
            target = dst / src.relative_to(export)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(src.resolve())
    return dst


def load(kind: str, path: Path):
    t0 = time.perf_counter()
    if kind == "ort":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionXLPipeline

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        pipe = ORTStableDiffusionXLPipeline.from_pretrained(str(path), session_options=so)
    else:
        from optimum.intel import OVStableDiffusionXLPipeline

        pipe = OVStableDiffusionXLPipeline.from_pretrained(str(path), ov_config=dict(OV_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe, round(time.perf_counter() - t0, 2)


# --- the diagnostic: text-encoder outputs picked by name ---------------------------------------------------------------

def named_outputs(part, input_ids: torch.Tensor) -> dict:
    """Run a loaded Optimum text-encoder part's graph directly and return its outputs by name."""
    ids = input_ids.numpy()
    session = getattr(part, "session", None)
    if session is not None:  # ORT
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {"input_ids": ids})
    else:  # OpenVINO
        part.compile()
        result = part.request({"input_ids": ids})
        names = [o.get_any_name() for o in part.model.outputs]
        values = [result[i] for i in range(len(names))]
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, values)}


def embeddings_by_name(pipe) -> dict:
    """SDXL's prompt embeddings (penultimate hidden state of both encoders, concatenated; pooled: text_embeds of
    text_encoder_2), as diffusers' encode_prompt builds them, but reading the graph outputs by name."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = named_outputs(encoder, ids)
        n = sum(k.startswith("hidden_states.") for k in out)  # hidden_states.0 .. hidden_states.<layers>
        hidden.append(out[f"hidden_states.{n - 2}"])
        pooled = out.get("text_embeds")
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def what_optimum_hands_diffusers(pipe) -> dict:
    """The ModelOutput each loaded text encoder returns to diffusers' encode_prompt (keys in order; [0]'s rank)."""
    out = {}
    ids = pipe.tokenizer(PROMPTS[:1], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    for name in ("text_encoder", "text_encoder_2"):
        mo = getattr(pipe, name)(ids, output_hidden_states=True)
        out[name] = {"keys": list(mo.keys()), "[0]": f"{list(mo.keys())[0]} rank {mo[0].ndim}"}
    return out


# --- one loader ----------------------------------------------------------------------------------------------------------

def check(kind: str, export: Path, work: Path, reference: dict) -> dict:
    res: dict = {"pipeline": PIPELINES[kind], "dir": str(export)}
    if kind == "ov":
        res["ov_config"] = OV_CONFIG
    try:
        pipe, res["load_s"] = load(kind, export)
        res["loaded_from"] = "combined export"
    except Exception as exc:  # noqa: BLE001 -- record, then retry on a single-format copy
        res["combined_dir_error"] = error_record(exc)
        single = single_format_copy(export, "onnx" if kind == "ort" else "openvino", work)
        try:
            pipe, res["load_s"] = load(kind, single)
            res["loaded_from"] = f"single-format copy (symlinks) {single}"
        except Exception as exc2:  # noqa: BLE001
            res.update(loads=False, ok=False, load_error=error_record(exc2))
            print(f"  {kind}: FAILED to load: {res['load_error']['error']}")
            return res
    res["loads"] = True
    res["scheduler"] = type(pipe.scheduler).__name__
    try:
        res["text_encoder_outputs_as_handed_to_diffusers"] = what_optimum_hands_diffusers(pipe)
    except Exception as exc:  # noqa: BLE001
        res["text_encoder_outputs_as_handed_to_diffusers"] = error_record(exc)

    res["runs"], res["diagnostic_runs"] = {}, {}
    for g in GUIDANCE:
        key = f"guidance={g:g}"
        t0 = time.perf_counter()
        try:
            images = call(pipe, g, prompt=PROMPTS)
            res["runs"][key] = {"max_abs_diff": float(np.abs(images - reference[g]).max()),
                                "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as exc:  # noqa: BLE001
            res["runs"][key] = error_record(exc)
        print(f"  {kind} {key}: {res['runs'][key].get('max_abs_diff', res['runs'][key].get('error'))}")
    if any("error" in r for r in res["runs"].values()):
        try:
            embeds = embeddings_by_name(pipe)
        except Exception as exc:  # noqa: BLE001
            embeds = None
            res["diagnostic_error"] = error_record(exc)
        for g in GUIDANCE if embeds is not None else ():
            key = f"guidance={g:g}"
            try:
                images = call(pipe, g, **embeds)
                res["diagnostic_runs"][key] = {"max_abs_diff": float(np.abs(images - reference[g]).max())}
            except Exception as exc:  # noqa: BLE001
                res["diagnostic_runs"][key] = error_record(exc)
            d = res["diagnostic_runs"][key]
            print(f"  {kind} diagnostic (text-encoder outputs by name) {key}: "
                  f"{d.get('max_abs_diff', d.get('error'))}")
    diffs = [r.get("max_abs_diff") for r in res["runs"].values()]
    res["ok"] = all(d is not None and d <= ATOL for d in diffs)
    return res


# --- report --------------------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {}
    for n in VERSIONS:
        try:
            out[n] = version(n)
        except Exception:  # noqa: BLE001
            out[n] = None
    return out


def cell(run: dict | None) -> str:
    if run is None:
        return "-"
    return f"{run['max_abs_diff']:.1e}" if "max_abs_diff" in run else f"fails ({run['error'].split(':')[0]})"


def write_markdown(report: dict, path: Path) -> str:
    gs = [f"guidance={g:g}" for g in GUIDANCE]
    lines = [
        "# Optimum loads diffship's SDXL export",
        "",
        f"Date: {report['date']}. Machine: {report['machine']}. Made by "
        "`.venv-optimum/bin/python benchmarks/peers/check_optimum_loads_diffship_sdxl.py "
        f"--export {report['export']} --source {report['source']}`.",
        "",
        f"diffship {report['diffship_version']} export of a tiny SDXL model with `--backend onnx,openvino` (one "
        "directory, `model.onnx` and `openvino_model.xml` side by side in each component folder). Oracle: diffusers' "
        "StableDiffusionXLPipeline (torch, add_watermarker=False) on the source model. Same prompts (batch of 2), "
        f"latents and scheduler ({report['scheduler']}), {STEPS} steps, {SIZE}x{SIZE}, output_type np; bound {ATOL:g} "
        "max abs. OpenVINO with INFERENCE_PRECISION_HINT f32.",
        "",
        "Optimum venv: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| loader | loads? | " + " | ".join(f"max abs vs diffusers, {g}" for g in gs) + " | notes |",
        "| --- | --- | " + " | ".join("---" for _ in gs) + " | --- |",
    ]
    for name, res in report["loads"].items():
        loads = ("yes (" + res["loaded_from"] + ")") if res.get("loads") else "no"
        notes = []
        if "combined_dir_error" in res:
            notes.append(f"combined dir failed: `{res['combined_dir_error']['error'][:120]}`")
        errs = {r["key_line"] for r in res.get("runs", {}).values() if "error" in r}
        if errs:
            notes.append("generation fails in diffusers' encode_prompt (pooled_prompt_embeds is None), see below")
        diag = res.get("diagnostic_runs", {})
        if diag:
            notes.append("diagnostic, text-encoder outputs by name: "
                         + ", ".join(f"{k} {cell(v)}" for k, v in diag.items()))
        lines.append(f"| {name} | {loads} | " + " | ".join(cell(res.get("runs", {}).get(g)) for g in gs)
                     + f" | {'; '.join(notes) or '-'} |")
    lines += ["", f"Result: **{'pass' if report['passed'] else 'FAIL'}** (pass = both pipelines load and every run "
              f"with the prompts is within {ATOL:g} of diffusers).", ""]
    failures = [(name, key, run) for name, res in report["loads"].items()
                for key, run in res.get("runs", {}).items() if "error" in run]
    if failures:
        lines += ["Failures (exception; innermost traceback frame):", ""]
        for name, key, run in failures:
            lines.append(f"- {name} {key}: `{run['error']}` at `{run['key_line']}`")
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=Path("/tmp/xo/sdxl"), help="diffship SDXL export")
    parser.add_argument("--source", type=Path, default=Path("/tmp/tk/sdxl"), help="its diffusers source model")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optimum_loads_diffship_sdxl"))
    args = parser.parse_args()
    export, source = args.export.resolve(), args.source.resolve()  # optimum-intel reads a relative path as a hub id
    work = (args.work or Path(tempfile.mkdtemp(prefix="diffship-sdxl-"))).resolve()
    torch.set_num_threads(THREADS)

    from diffusers import StableDiffusionXLPipeline

    export_report = json.loads((export / "export_report.json").read_text()) \
        if (export / "export_report.json").is_file() else {}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    io = graph_io(export)
    te_loading = source_text_encoders_load(source)
    if te_loading:
        print(f"warning: the source's text encoders do not load cleanly in transformers 4.x: {te_loading}")

    print("diffusers StableDiffusionXLPipeline (torch) reference")
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(str(source), add_watermarker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    reference = {g: call(ref_pipe, g, prompt=PROMPTS) for g in GUIDANCE}
    prompts_differ = float(np.abs(reference[GUIDANCE[0]][0] - reference[GUIDANCE[0]][1]).max())
    guidance_matters = float(np.abs(reference[GUIDANCE[0]] - reference[GUIDANCE[1]]).max())

    loads = {
        "ORTStableDiffusionXLPipeline": check("ort", export, work, reference),
        "OVStableDiffusionXLPipeline (f32)": check("ov", export, work, reference),
    }
    passed = all(r["ok"] for r in loads.values())
    te2 = io["text_encoder_2"]
    notes = [
        f"diffship's text_encoder_2 graph outputs, in order: {', '.join(te2['onnx_outputs'][:3])}, ... (ONNX) and "
        f"{', '.join(te2['openvino_outputs'][:3])}, ... (OpenVINO). Optimum's own SDXL export "
        "(tests/fixtures/optimum-sdxl, CLIPTextWithProjectionOnnxConfig) puts `text_embeds` first: text_embeds, "
        "last_hidden_state, hidden_states.0, ... (diffship's order comes from src/diffship/exporters/components.py, "
        "text_encoder_spec: outputs = [\"last_hidden_state\", pooled] + hidden_states.N, and _TextEncoder.forward).",
        "diffusers 0.39 `StableDiffusionXLPipeline.encode_prompt` takes the pooled embedding by position: "
        "`if pooled_prompt_embeds is None and prompt_embeds[0].ndim == 2: pooled_prompt_embeds = prompt_embeds[0]` "
        "(pipeline_stable_diffusion_xl.py:408-409). Optimum's text-encoder parts return the graph outputs in graph "
        "order (ORT: a ModelOutput of every output; OpenVINO's OVModelTextEncoder keeps outputs[0] under its name, "
        "outputs[1] only if it is named pooler_output (modeling_diffusion.py:1177), and the hidden_states, so diffship's text_embeds is dropped "
        "altogether). With diffship's order [0] is last_hidden_state (rank 3), pooled_prompt_embeds stays None, and "
        "the pipeline fails at the first use of it: `torch.zeros_like(pooled_prompt_embeds)` (line 425, guidance > 1 "
        "with force_zeros_for_empty_prompt) or `pooled_prompt_embeds.repeat(...)` (line 501, guidance 1).",
        "As the loaded pipelines hand the text-encoder outputs to diffusers: "
        + "; ".join(f"{name}: " + ", ".join(f"{te} [{v['keys'] and ', '.join(v['keys'])}], [0] = {v['[0]']}"
                                           for te, v in r.get("text_encoder_outputs_as_handed_to_diffusers",
                                                              {}).items() if isinstance(v, dict) and "keys" in v)
                     for name, r in loads.items() if r.get("loads")) + ".",
        f"UNet timestep input: diffship ONNX `{[i for i in io['unet']['onnx_inputs'] if i.startswith('timestep')][0]}`"
        f", diffship OpenVINO `{[i for i in io['unet']['openvino_inputs'] if i.startswith('timestep')][0]}` "
        "(Optimum's own OpenVINO export: i64 [?]). Not a failure: both pipelines pass diffusers' 0-d float32 "
        "timestep through (ORTUnet.forward unsqueezes it only when the graph's timestep has rank > 0; OVModelUnet.forward "
        "passes it as given and _reshape_unet touches timestep only when it has rank 1), as the diagnostic runs show.",
        "Both pipelines loaded the combined directory (ORT reads <component>/model.onnx, OpenVINO "
        "<component>/openvino_model.xml with from_onnx=False); no single-format copy was needed."
        if all(r.get("loaded_from") == "combined export" for r in loads.values())
        else "A pipeline needed a single-format copy of the export (symlinks); see loaded_from.",
        f"The two prompts' reference images differ by {prompts_differ:.2f} max abs, and guidance 5 vs 1 by "
        f"{guidance_matters:.2f}, so the text path and the guidance branch matter.",
        "optimum-intel logs `Could not infer whether the model was already converted or not to the OpenVINO IR, "
        "keeping export=False` and a missing hub-cache `refs/main` for a local path; harmless.",
    ]
    if te_loading:
        notes.append(f"The source's text encoders did not load cleanly in transformers 4.x: {te_loading}")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "diffship_version": export_report.get("versions", {}).get("diffship", "unknown"),
        "export_made_with": export_report.get("versions"),
        "versions": versions(),
        "export": str(export),
        "source": str(source),
        "work": str(work),
        "prompts": PROMPTS,
        "steps": STEPS,
        "size": SIZE,
        "guidance": GUIDANCE,
        "atol": ATOL,
        "scheduler": type(ref_pipe.scheduler).__name__,
        "threads": THREADS,
        "source_text_encoders_loading_info": te_loading or "clean (no missing/unexpected/mismatched keys)",
        "reference_prompts_differ_by": prompts_differ,
        "reference_guidance_5_vs_1": guidance_matters,
        "graph_io": io,
        "loads": loads,
        "passed": passed,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(write_markdown(report, args.out.with_suffix(".md")))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
