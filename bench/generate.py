"""Bench `medsd generate` against the plain loop a user would write, and its memory at N and 8N images.

    python bench/generate.py [--n 128] [--steps 20] [--batch-size 8] [--actors 2] [--cpus-per-actor 1]

Every figure comes from this one run, each workload in its own subprocess timed end to end (interpreter
start to last file written). The plain loop (pipeline call per batch, then PNGs saved one by one, with
sleeping OpenMP threads as medsd's actors use) and `medsd generate` alternate at N, best of each kept;
then the loop once with torch's default (spinning) OpenMP threads; then `medsd generate` at 8N. Peak RSS
is that of medsd's whole process tree (driver, Ray's daemons and the actors), sampled with psutil.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LABEL = "Cardiomegaly"  # per_label plan: N/2 images of it and N/2 of No Finding
PROMPT = "a frontal PA chest x-ray showing cardiomegaly"
GUIDANCE_SCALE = 4.0
RSS_SAMPLE_S = 0.1
MB = 1024**2
TIMEOUT_S = 3600
LOOP_TIME_LIMIT = 3.0  # the default-OpenMP loop may take this many times medsd's wall time before it is stopped
PASSIVE_OMP = {"OMP_WAIT_POLICY": "PASSIVE"}  # sleeping OpenMP threads, as medsd's CPU actors use


def plain_loop(out: str, n_images: int, steps: int, batch_size: int) -> None:
    """What a user writes without medsd: load once, call the pipeline per batch, save each PNG."""
    import torch

    from medsd.config import ModelConfig
    from medsd.models import load_pipeline

    pipe = load_pipeline(ModelConfig(model="tiny"), "dpm++")
    for start in range(0, n_images, batch_size):
        seeds = range(start, min(start + batch_size, n_images))
        images = pipe(
            [PROMPT] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        ).images
        for seed, image in zip(seeds, images, strict=True):
            image.convert("L").save(Path(out) / f"{seed:06d}.png")


def timed_tree(command: list[str], env: dict[str, str], time_limit_s: float = TIMEOUT_S) -> tuple[float, int, bool]:
    """Run ``command``; return (wall seconds, peak summed RSS in bytes of it and all its descendants, whether
    it was stopped at ``time_limit_s``)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        if time.perf_counter() - started > time_limit_s:
            process.kill()
            process.wait()
            return time.perf_counter() - started, peak, True
        total = 0
        try:
            for member in [root, *root.children(recursive=True)]:
                total += member.memory_info().rss
        except psutil.Error:  # a member exited while we looked; the next sample counts the rest
            pass
        peak = max(peak, total)
        time.sleep(RSS_SAMPLE_S)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return seconds, peak, False


def run_medsd(out: Path, n_images: int, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """`medsd generate` at ``n_images`` into ``out``: wall seconds, peak tree RSS and the manifest's timings."""
    command = [
        sys.executable, "-c", "from medsd.cli import main; main()", "generate",
        "--model", "tiny", "--out", str(out), "--labels", LABEL, "--per-label", str(n_images // 2),
        "--steps", str(args.steps), "--guidance", str(GUIDANCE_SCALE),
        "--set", f"batch_size={args.batch_size}", "--set", f"num_actors={args.actors}",
        "--set", f"cpus_per_actor={args.cpus_per_actor}", "--set", "sampler=dpm++",
    ]  # fmt: skip
    seconds, peak, _stopped = timed_tree(command, env)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "peak_rss": peak, "timings": manifest["timings"], "images": manifest["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images of the speed comparison (and of the RSS 'N')")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating loop / medsd runs at N; best of each")
    parser.add_argument("--loop-into", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop
    args = parser.parse_args()
    if args.loop_into is not None:
        plain_loop(args.loop_into, args.n, args.steps, args.batch_size)
        return

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # medsd starts its own local Ray
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    from medsd.models import resolve_model_dir

    resolve_model_dir("tiny")  # build the cached model once, outside every timing
    with tempfile.TemporaryDirectory(prefix="medsd-bench-") as scratch:
        scratch = Path(scratch)
        loop = [sys.executable, __file__, "--n", str(args.n), "--steps", str(args.steps)]
        loop += ["--batch-size", str(args.batch_size)]
        # Alternate the loop and medsd and keep the best of each, so a burst of load on a shared machine
        # does not decide the ratio.
        loop_passive_s, runs_at_n = [], []
        for repeat in range(args.repeats):
            folder = scratch / f"loop-passive-{repeat}"
            folder.mkdir()
            seconds, _peak, _stopped = timed_tree([*loop, "--loop-into", str(folder)], {**env, **PASSIVE_OMP})
            loop_passive_s.append(seconds)
            runs_at_n.append(run_medsd(scratch / f"medsd-n-{repeat}", args.n, args, env))
        best_n = min(runs_at_n, key=lambda run: run["seconds"])
        # The default-OpenMP loop gets at most LOOP_TIME_LIMIT x medsd's time: spinning threads can crawl on a
        # busy machine, and then its rate is the PNGs written by the limit.
        folder = scratch / "loop-default"
        folder.mkdir()
        seconds, _peak, default_stopped = timed_tree(
            [*loop, "--loop-into", str(folder)], env, LOOP_TIME_LIMIT * best_n["seconds"]
        )
        loop_rates = {"default": len(list(folder.glob("*.png"))) / seconds, "passive": args.n / min(loop_passive_s)}
        at_8n = run_medsd(scratch / "medsd-8n", 8 * args.n, args, env)

    medsd_rate = best_n["images"] / best_n["seconds"]
    peak_rss_n = max(run["peak_rss"] for run in runs_at_n)
    figures = {
        "bench": "generate",
        "n": args.n,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "cores": os.cpu_count(),
        "repeats": args.repeats,
        "loop_images_per_s": round(loop_rates["default"], 3),
        "loop_stopped_at_limit": default_stopped,
        "loop_passive_omp_images_per_s": round(loop_rates["passive"], 3),
        "medsd_images_per_s": round(medsd_rate, 3),
        "medsd_vs_best_loop": round(medsd_rate / max(loop_rates.values()), 3),
        "medsd_vs_default_loop": round(medsd_rate / loop_rates["default"], 3),
        "medsd_8n_images_per_s": round(at_8n["images"] / at_8n["seconds"], 3),
        "medsd_generate_s_n": best_n["timings"]["generate_s"],
        "medsd_generate_s_8n": at_8n["timings"]["generate_s"],
        "peak_rss_mb_n": round(peak_rss_n / MB, 1),
        "peak_rss_mb_8n": round(at_8n["peak_rss"] / MB, 1),
        "peak_rss_8n_over_n": round(at_8n["peak_rss"] / peak_rss_n, 3),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
