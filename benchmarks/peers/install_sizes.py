"""How much a machine must install to run each stack: diffship's runtime (no torch) against Optimum's.

    .venv/bin/python benchmarks/peers/install_sizes.py [--work /tmp/diffship-install-sizes] \
        [--out benchmarks/results/install_sizes.json] [--per-runtime]

Creates throwaway virtual environments (Python 3.11, pip's ordinary client, this machine's package index) and
measures them with `du`:

- diffship[onnxruntime,openvino]: `pip install <repo>[onnxruntime,openvino]`, no torch;
- Optimum: the venv benchmarks/peers/setup_optimum_venv.sh makes (optimum-onnx[onnxruntime] and
  optimum-intel[openvino], with torch, which both need), measured where it is (.venv-optimum);
- with --per-runtime also diffship[onnxruntime], diffship[openvino], and Optimum's ORT stack alone
  (torch + optimum-onnx[onnxruntime]) and OpenVINO stack alone (torch + optimum-intel[openvino]), pinned as the
  setup script pins them.

Sizes are of the whole venv and of its site-packages (pip and setuptools included in both, as any venv has them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; a bare torch requirement pulls a CUDA build
OPTIMUM_ORT = ["optimum==2.1.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.6", "diffusers==0.39.0"]
OPTIMUM_OV = ["optimum==2.1.0", "optimum-intel[openvino]==1.27.0", "optimum-onnx==0.1.0", "transformers==4.57.6",
              "diffusers==0.39.0"]


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python3*/site-packages"))


def measure(venv: Path, what: str) -> dict:
    packages = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                              capture_output=True, text=True).stdout.split()
    has_torch = any(p.lower().startswith("torch==") for p in packages)
    return {"what": what, "venv": str(venv), "venv_mb": du_bytes(venv) / 2**20,
            "site_packages_mb": du_bytes(site_packages(venv)) / 2**20, "packages": len(packages),
            "has_torch": has_torch}


def make_venv(venv: Path, requirements: list[str], log) -> float:
    start = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    log(f"  pip install {' '.join(requirements)}")
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {requirements} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffship-install-sizes"))
    parser.add_argument("--optimum-venv", type=Path, default=REPO / ".venv-optimum")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "install_sizes.json")
    parser.add_argument("--per-runtime", action="store_true", help="also each runtime's stack alone (5 venvs)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway venvs")
    args = parser.parse_args()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    plans = {"diffship[onnxruntime,openvino]": [f"{REPO}[onnxruntime,openvino]"]}
    if args.per_runtime:
        plans.update({"diffship[onnxruntime]": [f"{REPO}[onnxruntime]"],
                      "diffship[openvino]": [f"{REPO}[openvino]"],
                      "optimum-onnx[onnxruntime] + torch": [TORCH, *OPTIMUM_ORT],
                      "optimum-intel[openvino] + torch": [TORCH, *OPTIMUM_OV]})
    sizes = {}
    args.work.mkdir(parents=True, exist_ok=True)
    for i, (what, requirements) in enumerate(plans.items()):
        venv = args.work / f"venv-{i}"
        log(f"{what}:")
        seconds = make_venv(venv, requirements, log)
        sizes[what] = {**measure(venv, what), "requirements": requirements, "install_s": round(seconds, 1)}
        log(f"  {sizes[what]['venv_mb']:.0f} MiB ({sizes[what]['packages']} packages)")
        if not args.keep:
            shutil.rmtree(venv)
    if not (args.optimum_venv / "bin" / "python").exists():
        raise SystemExit(f"{args.optimum_venv} is missing: run benchmarks/peers/setup_optimum_venv.sh first")
    sizes["optimum (ORT + OpenVINO)"] = {**measure(args.optimum_venv, "optimum (ORT + OpenVINO)"),
                                         "requirements": "benchmarks/peers/setup_optimum_venv.sh"}

    def ratio(a, b):
        return sizes[a]["site_packages_mb"] / sizes[b]["site_packages_mb"] if a in sizes and b in sizes else None

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "sizes": sizes,
        "ratios": {
            "diffship[onnxruntime,openvino] / optimum (ORT + OpenVINO)":
                ratio("diffship[onnxruntime,openvino]", "optimum (ORT + OpenVINO)"),
            "diffship[onnxruntime] / optimum-onnx[onnxruntime] + torch":
                ratio("diffship[onnxruntime]", "optimum-onnx[onnxruntime] + torch"),
            "diffship[openvino] / optimum-intel[openvino] + torch":
                ratio("diffship[openvino]", "optimum-intel[openvino] + torch"),
        },
        "measure": "du -sb of site-packages (pip and setuptools included on both sides)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for what, s in sizes.items():
        print(f"{what:<40} venv {s['venv_mb']:7.0f} MiB   site-packages {s['site_packages_mb']:7.0f} MiB"
              f"   {s['packages']:3d} packages{'   (torch)' if s['has_torch'] else ''}")
    for name, value in report["ratios"].items():
        if value is not None:
            print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
