"""Real model sizes on this machine: s/step and peak RSS of one uniflow training step at 1B and 7B.

    .venv/bin/python benchmarks/scale_bench.py                       # random-1b: fp32, bf16, ± checkpointing, nf4
    .venv/bin/python benchmarks/scale_bench.py --preset random-7b --configs bf16+ckpt   # the paper's LLM size

Each configuration runs in a fresh subprocess (its peak RSS is its own): build the base (``random-1b``:
Llama-3.2-1B shapes + DINOv2-base; ``random-7b``: Llama-2-7B / Vicuna-7B + DINOv2-large; random weights,
materialised from the meta device in the precision), add LoRA (r = 8 on q/v and the encoder), then
``training.train_loop`` — the loop ``uniflow local-train`` runs — for ``--steps`` steps on image questions
(the encoder and the LLM both train: ``stages = "joint"``). Printed per configuration: build seconds,
seconds per step (the mean after the first; wall and CPU seconds of all threads), peak RSS (and peak GPU memory on CUDA), the math mode (``compute.math_mode``: on a CPU
without bf16 kernels bf16 is storage only and the matmuls run in float32) and the first loss.

Configurations: ``fp32``, ``bf16``, ``nf4`` (QLoRA: the LLM's linear layers in 4 bits, over a bf16 base),
each with ``+ckpt`` for gradient checkpointing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt", "nf4+ckpt")


def samples(n: int, seed: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"id": f"s{i}", "modality": "image", "question": "What colour is the shape in the middle of the picture?",
                     "answer": "a blue circle", "image": {"bytes": buf.getvalue(), "path": None}, "audio": None})
    return rows


def worker(args) -> None:
    import torch

    from uniflow_cli.compute import math_mode, precision_dtype
    from uniflow_cli.models import ModelSettings, enable_gradient_checkpointing, load_model
    from uniflow_cli.models.quantize import quantize_llm
    from uniflow_cli.settings import LoraSettings, TrainSettings
    from uniflow_cli.training import train_loop

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, _, ckpt = args.config.partition("+")
    precision = "bf16" if name == "nf4" else name
    started = time.perf_counter()
    settings = ModelSettings(preset=args.preset, modalities=["image"])
    model = load_model(settings, LoraSettings(r=8), seed=0, dtype=precision_dtype(precision))
    if name == "nf4":
        quantize_llm(model, "nf4", device=device, compute_dtype=torch.float32 if math_mode(device, "bf16") == "upcast" else torch.bfloat16)
    if ckpt:
        enable_gradient_checkpointing(model)
    built = time.perf_counter() - started
    cfg = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=1e-4, stages="joint", warmup_ratio=0.0, precision=precision)
    # Wall and CPU time (all threads) per step: on a shared machine the CPU seconds are the steadier figure.
    times: list[tuple[float, float]] = [(time.perf_counter(), time.process_time())]
    stats = train_loop(model, samples(args.batch_size * args.steps, 0), cfg, method="fedA2", seed=0, device=device,
                       on_step=lambda *_: times.append((time.perf_counter(), time.process_time())))
    steps = [b[0] - a[0] for a, b in zip(times, times[1:])]
    cpu = [b[1] - a[1] for a, b in zip(times, times[1:])]
    print(json.dumps({
        "config": args.config, "preset": args.preset, "build_s": round(built, 1), "first_step_s": round(steps[0], 2),
        "step_s": round(sum(steps[1:]) / max(1, len(steps) - 1), 2) if len(steps) > 1 else round(steps[0], 2),
        "cpu_s_per_step": round(sum(cpu[1:]) / max(1, len(cpu) - 1), 2) if len(cpu) > 1 else round(cpu[0], 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "math": stats.math,
        "first_loss": round(stats.losses[0], 4), "tokens": stats.tokens, "device": str(device),
        **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)} if device.type == "cuda" else {}),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="random-1b", choices=("random-1b", "random-7b"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N] (benchmarks/gpu_check.sh)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"# {args.preset}: image QA, batch {args.batch_size}, {args.steps} steps, {args.threads} threads, {os.cpu_count()} CPUs")
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", "1", "--config", config, "--preset", args.preset, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else json.dumps(
            {"config": config, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        print(line, flush=True)


if __name__ == "__main__":
    main()
