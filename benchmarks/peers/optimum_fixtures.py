"""Helpers of `make_optimum_fixtures.sh` (see there for the whole story). Four subcommands:

    python optimum_fixtures.py hub-layout MODEL_DIR
        Rewrite MODEL_DIR/text_encoder/model.safetensors (and text_encoder_2/, SDXL's, where there is one) with the
        `text_model.` key prefix that CLIP checkpoints on the Hub use. transformers 5 saves CLIPTextModel without
        it, and transformers 4.x (which Optimum pins) then silently initialises the whole text encoder at random
        ("Some weights ... newly initialized"), so Optimum would export a different model from the one diffusers
        runs. CLIPTextModelWithProjection's `text_projection.*` sits beside `text_model`, not in it, and keeps its
        name. transformers 5 reads either layout, so the fixture stays one model for both. Needs numpy +
        safetensors only (either venv). Idempotent.

    python optimum_fixtures.py check-load MODEL_DIR
        Load every text encoder of MODEL_DIR with this venv's transformers (run it in the Optimum venv) and fail
        if any weight is missing, unexpected or mismatched: the "newly initialized" case, caught without relying
        on a log message.

    python optimum_fixtures.py manifest FIXTURE_ROOT [--kind sd1|sd2|sdxl]
        Write FIXTURE_ROOT/MANIFEST.json: how each folder was made (commands, versions of the Optimum venv), every
        file with its size and sha256, the sha256 of the source model (what the exports were made from) and the
        total size. No timestamps, so that an unchanged fixture set gives the same manifest. Run it in the Optimum
        venv (it records that venv's versions). --kind (default sd1) names the source folder, tiny-<kind>.

    python optimum_fixtures.py source-sha256 MODEL_DIR
        The digest of a folder that MANIFEST.json records as source_sha256.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

PREFIX = "text_model."
KEEP = ("text_projection.",)  # CLIPTextModelWithProjection's projection, beside text_model
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
ONNX, OPENVINO = "onnx", "openvino"
KINDS = {
    "sd1": {
        "source": "tiny-sd1",
        "what": "A tiny SD 1.x pipeline (diffusers format) and Optimum's ONNX and OpenVINO exports of it, for "
                "tests/test_interop_optimum.py. Made by benchmarks/peers/make_optimum_fixtures.sh; do not edit.",
        "source_made_by": "diffship tiny-model tiny-sd1 --kind sd1 (main venv), then text_encoder weights renamed "
                          "to the Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout)",
    },
    "sd2": {
        "source": "tiny-sd2",
        "what": "A tiny SD 2.x pipeline (diffusers format: v-prediction, linear projections, upcast attention) and "
                "Optimum's ONNX and OpenVINO exports of it, for tests/test_openvino_genai.py. Made by "
                "benchmarks/peers/make_optimum_fixtures.sh --kind sd2; do not edit.",
        "source_made_by": "diffship tiny-model tiny-sd2 --kind sd2 (main venv), then text_encoder weights renamed "
                          "to the Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout)",
    },
    "sdxl": {
        "source": "tiny-sdxl",
        "what": "A tiny SDXL pipeline (diffusers format) and Optimum's ONNX and OpenVINO exports of it, for "
                "diffship's Optimum interop tests. Made by benchmarks/peers/make_optimum_fixtures.sh --kind sdxl; "
                "do not edit.",
        "source_made_by": "diffship tiny-model tiny-sdxl --kind sdxl (main venv), text_encoder and text_encoder_2 "
                          "weights in the Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout)",
    },
}


def _hub_name(key: str) -> str:
    return key if key.startswith(PREFIX) or key.startswith(KEEP) else PREFIX + key


def hub_layout(model_dir: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    paths = [model_dir / name / "model.safetensors" for name in TEXT_ENCODERS]
    if not paths[0].is_file():
        raise SystemExit(f"error: no {paths[0]}")
    for path in paths:
        if not path.is_file():
            continue
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if all(_hub_name(k) == k for k in tensors):
            print(f"{path}: already in the Hub layout")
            continue
        renamed = {_hub_name(k): v for k, v in tensors.items()}
        save_file(renamed, str(path), metadata=metadata)
        print(f"{path}: {len(renamed)} tensors renamed to the Hub layout ({PREFIX}*)")


def check_load(model_dir: Path) -> None:
    """Every text encoder loads with no missing, unexpected or mismatched weight in this venv's transformers."""
    import transformers

    index = json.loads((model_dir / "model_index.json").read_text())
    bad = []
    for name in TEXT_ENCODERS:
        entry = index.get(name)
        if not entry or entry[0] is None or not (model_dir / name).is_dir():
            continue
        cls = getattr(transformers, entry[1])
        _, info = cls.from_pretrained(str(model_dir / name), output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
            {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
        status = "all weights loaded" if not problems else f"NOT loaded right: {problems}"
        print(f"{model_dir.name}/{name} ({entry[1]}, transformers {transformers.__version__}): {status}")
        if problems:
            bad.append(name)
    if bad:
        raise SystemExit(f"error: transformers {transformers.__version__} does not load every weight of "
                         f"{', '.join(bad)} in {model_dir}")


def tree_digest(root: Path) -> tuple[str, list[dict]]:
    """sha256 over (relative path, file sha256) of every file, and the per-file rows."""
    rows, total = [], hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        rel = p.relative_to(root).as_posix()
        rows.append({"path": rel, "bytes": p.stat().st_size, "sha256": digest})
        total.update(f"{rel}\0{digest}\n".encode())
    return total.hexdigest(), rows


def manifest(root: Path, kind: str = "sd1") -> None:
    from importlib.metadata import version

    spec = KINDS[kind]
    source = spec["source"]
    names = ["optimum", "optimum-onnx", "optimum-intel", "onnx", "onnxruntime", "openvino", "openvino-tokenizers",
             "diffusers", "transformers", "torch"]
    folders = {}
    for name in (source, ONNX, OPENVINO):
        digest, rows = tree_digest(root / name)
        folders[name] = {"sha256": digest, "bytes": sum(r["bytes"] for r in rows), "files": rows}
    data = {
        "what": spec["what"],
        "made_by": {
            source: spec["source_made_by"],
            ONNX: f"optimum-cli export onnx --model {source} --task text-to-image onnx",
            OPENVINO: f"optimum-cli export openvino --model {source} --task text-to-image --weight-format fp32 "
                      "openvino",
        },
        "optimum_venv_versions": {n: version(n) for n in names},
        "source_sha256": folders[source]["sha256"],
        "total_bytes": sum(f["bytes"] for f in folders.values()),
        "folders": folders,
    }
    (root / "MANIFEST.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"{root / 'MANIFEST.json'}: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in folders.items())
          + f", total {data['total_bytes'] / 1e6:.1f} MB")


def main(argv: list[str]) -> int:
    kind = "sd1"
    if len(argv) == 4 and argv[0] == "manifest" and argv[2] == "--kind" and argv[3] in KINDS:
        kind, argv = argv[3], argv[:2]
    if len(argv) != 2 or argv[0] not in ("hub-layout", "check-load", "manifest", "source-sha256"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command == "hub-layout":
        hub_layout(path)
    elif command == "check-load":
        check_load(path)
    elif command == "manifest":
        manifest(path, kind)
    else:  # the digest the shell script compares with MANIFEST.json's source_sha256
        print(tree_digest(path)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
