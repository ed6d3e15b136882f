"""Load test of `diffship serve`: a fixed number of requests from concurrent clients, against 1 and 2 model replicas
with batching on and off, plus the fault (a replica killed mid-load), drain and timeout checks.

Every request carries its own id and seed. A run passes when every request was answered, within the time limit,
either with its image (the id echoed, a PNG of the asked size) or with a clean 503 (Retry-After); none lost, none
answered twice or with another request's id. Across configurations the image of a seed must be the same bytes
(ONNX Runtime: a batch does not change an image). Figures: throughput, p50/p95/p99 latency, batch sizes.

    .venv/bin/python benchmarks/serve_load.py [--model EXPORT_DIR] [--requests 200] [--concurrency 16]
        [--out benchmarks/results/serve_load]

Without --model, the tiny sd1 pipeline is built and exported once under out/serve_load/ (about a minute). Ray is
started here (HTTP on 127.0.0.1) and stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffship.benchmarking.machine import machine_info, now, versions
from diffship.benchmarking.report import write_report
from diffship.serving.options import APP_NAME, MODEL_DEPLOYMENT, ServeOptions

BACKEND = "onnxruntime"
BATCH_SIZE = 4  # batching on: up to 4 requests, gathered for BATCH_WAIT_MS
BATCH_WAIT_MS = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple[int, dict, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, headers, payload = e.code, dict(e.headers), e.read()
    try:
        payload = json.loads(payload)
    except ValueError:
        pass
    return status, headers, payload


def check_answer(sent_id: str, status: int, headers: dict, body, size: int) -> tuple[str, str | None]:
    """(outcome, image digest): 'image' (the id echoed, a PNG of the asked size), 'rejected' (503 with
    Retry-After and a JSON error), or 'error: ...' for anything else."""
    from PIL import Image

    if status == 200 and isinstance(body, dict):
        if body.get("request_id") != sent_id:
            return f"error: answered with id {body.get('request_id')!r}", None
        png = base64.b64decode(body["images"][0])
        image = Image.open(io.BytesIO(png))
        image.load()
        if image.size != (size, size):
            return f"error: image of {image.size}", None
        return "image", hashlib.sha256(image.tobytes()).hexdigest()
    if status == 503 and "Retry-After" in headers and isinstance(body, dict) and "error" in body:
        return "rejected", None
    message = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)[:200]
    return f"error: {status} {message}", None


def run_load(url: str, name: str, requests: int, concurrency: int, size: int, steps: int, time_limit: float,
             during=None) -> dict:
    """`requests` requests from `concurrency` clients; `during(done_count)` is called by the clients as answers
    come in (the fault test kills a replica from it)."""
    answers: dict[str, dict] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def one(index: int) -> None:
        request_id = f"{name}-{index}"
        body = {"prompt": "a red circle on the left", "height": size, "width": size, "num_inference_steps": steps,
                "seed": index, "request_id": request_id}
        start = time.perf_counter()
        try:
            status, headers, payload = post(url + "/generate", body, max(deadline - time.monotonic(), 0.1))
            outcome, digest = check_answer(request_id, status, headers, payload, size)
        except OSError as e:  # no answer within the time limit, or the connection dropped
            outcome, digest, payload = f"lost: {type(e).__name__}: {e}", None, None
        record = {"seed": index, "outcome": outcome, "seconds": time.perf_counter() - start, "digest": digest,
                  "batch_size": payload.get("batch_size") if isinstance(payload, dict) else None}
        with lock:
            if request_id in answers:
                record["outcome"] = "error: answered twice"
            answers[request_id] = record
            done = len(answers)
        if during is not None:
            during(done)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    records = list(answers.values())
    images = [r for r in records if r["outcome"] == "image"]
    latencies = sorted(r["seconds"] for r in images)
    batches = [r["batch_size"] for r in images]

    def pct(p):
        return latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))] if latencies else None

    outcomes = {}
    for r in records:
        key = r["outcome"] if r["outcome"] in ("image", "rejected") else r["outcome"].split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
    return {"requests": requests, "answered": len(records), "outcomes": outcomes,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "errors": sorted({r["outcome"] for r in records if r["outcome"] not in ("image", "rejected")})[:10],
            "wall_s": wall, "throughput_rps": len(images) / wall, "latency_p50_s": pct(50), "latency_p95_s": pct(95),
            "latency_p99_s": pct(99), "batch_size_mean": statistics.mean(batches) if batches else None,
            "batch_sizes": {str(b): batches.count(b) for b in sorted(set(batches))},
            "digests": {str(r["seed"]): r["digest"] for r in records if r["digest"]}}


def metric(url: str, name: str) -> float:
    """A counter's value from GET /metrics (summed over its labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def model_replicas() -> list[str]:
    """The names of the model deployment's replica actors (Serve names them after the deployment)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if MODEL_DEPLOYMENT in a["name"] and "REPLICA" in a["name"].upper())


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments[MODEL_DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.5)
    return time.monotonic() - start


def deploy(options: ServeOptions, url: str, size: int, steps: int) -> None:
    """Run the application with `options` (replacing the previous one), wait for every replica, warm it up."""
    from ray import serve

    from diffship.serving.app import build

    # The previous application goes first: a rolling update would start the new replicas beside the old ones,
    # which hold every CPU on a small machine.
    serve.delete(APP_NAME)
    serve.run(build(options), name=APP_NAME, route_prefix="/")
    wait_for(lambda: running_replicas() == options.num_replicas, 120)
    # Warm-up: each replica's first calls (and batch sizes) pay one-off costs.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: post(url + "/generate", {"prompt": "warm up", "height": size, "width": size,
                                                         "num_inference_steps": steps, "seed": i}, 120), range(16)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported pipeline (default: the tiny sd1, exported once)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model = args.model or tiny_export(Path("out/serve_load"))
    import ray
    from ray import serve

    cpus = os.cpu_count() or 1
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {"machine": machine_info(), "versions": versions(), "date": now(), "model": str(model),
               "backend": BACKEND, "size": args.size, "steps": args.steps, "requests": args.requests,
               "concurrency": args.concurrency, "configs": [], "checks": {}}
    try:
        for replicas in (1, 2):
            for batch in (1, BATCH_SIZE):
                # The replicas share the machine's cores: each gets its share of threads.
                options = ServeOptions(model_dir=str(model), backend=BACKEND, replicas=replicas, max_batch_size=batch,
                                       batch_wait_ms=BATCH_WAIT_MS, threads=max(cpus // replicas, 1), port=port)
                deploy(options, url, args.size, args.steps)
                name = f"r{replicas}-b{batch}"
                print(f"{name}: {args.requests} requests, {args.concurrency} clients", file=sys.stderr, flush=True)
                result = run_load(url, name, args.requests, args.concurrency, args.size, args.steps, args.time_limit)
                result.update(replicas=replicas, max_batch_size=batch, threads_per_replica=options.threads)
                results["configs"].append(result)
                print(summary_line(result), file=sys.stderr, flush=True)
        results["checks"]["same_image_across_configs"] = compare_digests(results["configs"])
        results["checks"]["fault"] = fault_test(url, model, port, cpus, args)
        results["checks"]["drain"] = drain_test(url, model, port, cpus, args)
        results["checks"]["timeout"] = timeout_test(url, model, port, cpus, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    for config in results["configs"]:
        config.pop("digests", None)
    print(write_report(args.out, results, markdown(results)))
    failed = [c for c in results["configs"] if not passed(c)] + [
        name for name, check in results["checks"].items() if not check["passed"]]
    return 1 if failed else 0


def passed(config: dict, allowed=("image", "rejected")) -> bool:
    return config["answered"] == config["requests"] and set(config["outcomes"]) <= set(allowed)


def summary_line(r: dict) -> str:
    return (f"  {r['outcomes']}, {r['throughput_rps']:.2f} images/s, p50 {r['latency_p50_s']:.3f} s, p95 "
            f"{r['latency_p95_s']:.3f} s, p99 {r['latency_p99_s']:.3f} s, mean batch {r['batch_size_mean']:.2f}")


def compare_digests(configs: list[dict]) -> dict:
    """A seed's image is the same bytes in every configuration (batched or not, 1 or 2 replicas)."""
    by_seed: dict[str, set] = {}
    for config in configs:
        for seed, digest in config["digests"].items():
            by_seed.setdefault(seed, set()).add(digest)
    differing = sorted((s for s, d in by_seed.items() if len(d) > 1), key=int)
    return {"seeds_compared": len(by_seed), "seeds_differing": len(differing), "examples": differing[:5],
            "passed": not differing}


def fault_test(url, model, port, cpus, args) -> dict:
    """2 replicas, batching on; when a third of the requests are answered, one model replica is killed (ray.kill).
    Every request must be answered (an image, a 503, or a 503 naming the dead replica: never lost), and the
    deployment must be back to 2 running replicas."""
    import ray

    options = ServeOptions(model_dir=str(model), backend=BACKEND, replicas=2, max_batch_size=BATCH_SIZE,
                           batch_wait_ms=BATCH_WAIT_MS, threads=max(cpus // 2, 1), port=port)
    deploy(options, url, args.size, args.steps)
    killed, lock = [], threading.Lock()
    retries_before = metric(url, "diffship_retries_total")

    def kill_one(done: int) -> None:
        with lock:
            if done >= args.requests // 3 and not killed:
                killed.append(model_replicas()[0])
                ray.kill(ray.get_actor(killed[0], namespace="serve"), no_restart=True)

    result = run_load(url, "fault", args.requests, args.concurrency, args.size, args.steps, args.time_limit,
                      during=kill_one)
    result.pop("digests")
    result["retried"] = metric(url, "diffship_retries_total") - retries_before
    # Full strength: two running replicas, the killed one not among them (replaced, not just not yet noticed).
    recovery = wait_for(lambda: running_replicas() == 2 and killed[0] not in model_replicas(), 120)
    after = post(url + "/generate", {"prompt": "after", "height": args.size, "width": args.size,
                                     "num_inference_steps": args.steps, "seed": 1, "request_id": "after"}, 60)
    errors_are_clean = all(e.startswith("error: 503") or e.startswith("error: 500") for e in result["errors"])
    result.update(killed=killed, recovered_in_s=recovery, running_after=running_replicas(),
                  request_after_recovery=after[0],
                  passed=result["answered"] == args.requests and "lost" not in result["outcomes"]
                  and errors_are_clean and after[0] == 200 and running_replicas() == 2)
    print(f"fault: killed {killed}, {summary_line(result)}, back to 2 replicas after {recovery:.1f} s",
          file=sys.stderr, flush=True)
    return result


def drain_test(url, model, port, cpus, args) -> dict:
    """Requests in flight when the application is deleted (shutdown) are answered with their images."""
    from ray import serve

    options = ServeOptions(model_dir=str(model), backend=BACKEND, replicas=1, max_batch_size=BATCH_SIZE,
                           batch_wait_ms=BATCH_WAIT_MS, threads=cpus, port=port)
    deploy(options, url, args.size, args.steps)
    count = 8
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(post, url + "/generate", {"prompt": "drain", "height": args.size, "width": args.size,
                                                         "num_inference_steps": args.steps * 10, "seed": i,
                                                         "request_id": f"drain-{i}"}, 120) for i in range(count)]
        time.sleep(0.5)  # the requests reach the replica
        serve.delete(APP_NAME)
        answers = [f.result() for f in futures]
    statuses = [status for status, _, _ in answers]
    print(f"drain: statuses {statuses}", file=sys.stderr, flush=True)
    return {"requests": count, "statuses": statuses, "passed": statuses == [200] * count}


def timeout_test(url, model, port, cpus, args) -> dict:
    """A request longer than the per-request timeout is answered 504 at the timeout."""
    options = ServeOptions(model_dir=str(model), backend=BACKEND, replicas=1, max_batch_size=1, threads=cpus,
                           port=port, request_timeout_s=1.0)
    deploy(options, url, args.size, args.steps)
    start = time.perf_counter()
    status, _, body = post(url + "/generate", {"prompt": "slow", "height": 256, "width": 256,
                                               "num_inference_steps": 500, "seed": 0}, 120)
    seconds = time.perf_counter() - start
    print(f"timeout: {status} after {seconds:.2f} s", file=sys.stderr, flush=True)
    return {"timeout_s": 1.0, "status": status, "answered_after_s": seconds,
            "error_type": body.get("error", {}).get("type") if isinstance(body, dict) else None,
            "passed": status == 504 and seconds < 5}


def tiny_export(root: Path) -> Path:
    from diffship.exporters import export
    from diffship.testing.tiny_models import save_tiny_pipeline

    target = root / "sd1-onnx"
    if not (target / "model_index.json").is_file():
        source = save_tiny_pipeline(root / "sd1", "sd1")
        export(source, target, ["onnx"], progress=False)
    return target


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# `diffship serve` under load",
        "",
        f"{results['date']}; {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB RAM; load test and "
        f"server on the same machine. Model: tiny sd1 ({results['backend']}), {results['size']}x{results['size']}, "
        f"{results['steps']} steps; {results['requests']} requests from {results['concurrency']} concurrent clients "
        f"per configuration (`benchmarks/serve_load.py`). Batching on: up to {BATCH_SIZE} requests gathered for "
        f"{BATCH_WAIT_MS:g} ms. Replicas share the cores (threads per replica = cores / replicas). Load average "
        f"at the start {m.get('loadavg_start')} (other work on the machine). Batch sizes: requests by the size "
        "of the pipeline call they ran in.",
        "",
        "| replicas | max batch | threads/replica | images | 503 | other | throughput (images/s) | p50 | p95 | p99 "
        "| mean batch | batch sizes | load average after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in results["configs"]:
        other = c["requests"] - c["outcomes"].get("image", 0) - c["outcomes"].get("rejected", 0)
        lines.append(
            f"| {c['replicas']} | {c['max_batch_size']} | {c['threads_per_replica']} | {c['outcomes'].get('image', 0)} "
            f"| {c['outcomes'].get('rejected', 0)} | {other} | {c['throughput_rps']:.2f} | "
            f"{c['latency_p50_s'] * 1e3:.0f} ms | {c['latency_p95_s'] * 1e3:.0f} ms | "
            f"{c['latency_p99_s'] * 1e3:.0f} ms | {c['batch_size_mean']:.2f} | {c['batch_sizes']} | {c.get('loadavg_after', '-')} |")
    lines += ["", "What batching buys here (batched / unbatched, same replicas):", ""]
    for replicas in sorted({c["replicas"] for c in results["configs"]}):
        off, on = (next(c for c in results["configs"] if c["replicas"] == replicas and (c["max_batch_size"] > 1) == b)
                   for b in (False, True))
        lines.append(f"- {replicas} replica(s): throughput {on['throughput_rps'] / off['throughput_rps']:.2f}x, p50 "
                     f"latency {on['latency_p50_s'] / off['latency_p50_s']:.2f}x, p99 "
                     f"{on['latency_p99_s'] / off['latency_p99_s']:.2f}x (mean batch {on['batch_size_mean']:.2f})")
    checks = results["checks"]
    same = checks["same_image_across_configs"]
    fault = checks["fault"]
    lines += [
        "",
        "Checks (each request carries its id and seed; an answer must echo the id with a PNG of the asked size, or "
        "be a 503 with Retry-After):",
        "",
        f"- every request answered, none lost or answered twice, in every configuration: "
        f"{all(passed(c) for c in results['configs'])}",
        f"- a seed's image is the same bytes in all four configurations (batched or not): {same['passed']} "
        f"({same['seeds_compared']} seeds, {same['seeds_differing']} differing)",
        f"- fault: replica `{fault['killed'][0] if fault['killed'] else '-'}` killed (`ray.kill`) after a third of "
        f"the answers; outcomes {fault['outcomes']}, errors {fault['errors'] or 'none'}, requests retried on the "
        f"other replica {fault['retried']:g}; back to "
        f"{fault['running_after']} running replicas {fault['recovered_in_s']:.1f} s after the load; a request after "
        f"recovery: {fault['request_after_recovery']}. Passed: {fault['passed']}",
        f"- drain: {checks['drain']['requests']} requests in flight when the application was deleted: statuses "
        f"{checks['drain']['statuses']}. Passed: {checks['drain']['passed']}",
        f"- timeout: a request longer than a 1 s timeout answered {checks['timeout']['status']} "
        f"({checks['timeout']['error_type']}) after {checks['timeout']['answered_after_s']:.2f} s. Passed: "
        f"{checks['timeout']['passed']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
