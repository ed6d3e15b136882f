"""Helpers of `make_optimum_fixtures.sh` (see there for the whole story). Two subcommands:

    python optimum_fixtures.py hub-layout MODEL_DIR
        Rewrite MODEL_DIR/text_encoder/model.safetensors with the `text_model.` key prefix that CLIP checkpoints on
        the Hub use. transformers 5 saves CLIPTextModel without it, and transformers 4.x (which Optimum pins) then
        silently initialises the whole text encoder at random ("Some weights ... newly initialized"), so Optimum
        would export a different model from the one diffusers runs. transformers 5 reads either layout, so the
        fixture stays one model for both. Needs numpy + safetensors only (either venv). Idempotent.

    python optimum_fixtures.py manifest FIXTURE_ROOT
        Write FIXTURE_ROOT/MANIFEST.json: how each folder was made (commands, versions of the Optimum venv), every
        file with its size and sha256, the sha256 of the source model (what the exports were made from) and the
        total size. No timestamps, so that an unchanged fixture set gives the same manifest. Run it in the Optimum
        venv (it records that venv's versions).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

PREFIX = "text_model."
SOURCE, ONNX, OPENVINO = "tiny-sd1", "onnx", "openvino"


def hub_layout(model_dir: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = model_dir / "text_encoder" / "model.safetensors"
    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if all(k.startswith(PREFIX) for k in tensors):
        print(f"{path}: already in the Hub layout")
        return
    renamed = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in tensors.items()}
    save_file(renamed, str(path), metadata=metadata)
    print(f"{path}: {len(renamed)} tensors renamed to the Hub layout ({PREFIX}*)")


def tree_digest(root: Path) -> tuple[str, list[dict]]:
    """sha256 over (relative path, file sha256) of every file, and the per-file rows."""
    rows, total = [], hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        rel = p.relative_to(root).as_posix()
        rows.append({"path": rel, "bytes": p.stat().st_size, "sha256": digest})
        total.update(f"{rel}\0{digest}\n".encode())
    return total.hexdigest(), rows


def manifest(root: Path) -> None:
    from importlib.metadata import version

    names = ["optimum", "optimum-onnx", "optimum-intel", "onnx", "onnxruntime", "openvino", "openvino-tokenizers",
             "diffusers", "transformers", "torch"]
    folders = {}
    for name in (SOURCE, ONNX, OPENVINO):
        digest, rows = tree_digest(root / name)
        folders[name] = {"sha256": digest, "bytes": sum(r["bytes"] for r in rows), "files": rows}
    data = {
        "what": "A tiny SD 1.x pipeline (diffusers format) and Optimum's ONNX and OpenVINO exports of it, for "
                "tests/test_interop_optimum.py. Made by benchmarks/peers/make_optimum_fixtures.sh; do not edit.",
        "made_by": {
            SOURCE: "diffship tiny-model tiny-sd1 --kind sd1 (main venv), then text_encoder weights renamed to the "
                    "Hub layout (benchmarks/peers/optimum_fixtures.py hub-layout)",
            ONNX: "optimum-cli export onnx --model tiny-sd1 --task text-to-image onnx",
            OPENVINO: "optimum-cli export openvino --model tiny-sd1 --task text-to-image --weight-format fp32 openvino",
        },
        "optimum_venv_versions": {n: version(n) for n in names},
        "source_sha256": folders[SOURCE]["sha256"],
        "total_bytes": sum(f["bytes"] for f in folders.values()),
        "folders": folders,
    }
    (root / "MANIFEST.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"{root / 'MANIFEST.json'}: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in folders.items())
          + f", total {data['total_bytes'] / 1e6:.1f} MB")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("hub-layout", "manifest", "source-sha256"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command == "hub-layout":
        hub_layout(path)
    elif command == "manifest":
        manifest(path)
    else:  # the digest the shell script compares with MANIFEST.json's source_sha256
        print(tree_digest(path)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
