"""Mixed precision and answer-only logits: uniflow's loop in fp32 / bf16 against plain transformers + PEFT loops.

    .venv/bin/python benchmarks/precision_bench.py                                   # smol, text,image,audio
    .venv/bin/python benchmarks/precision_bench.py --presets smol --modalities text --steps 3 --repeats 2

Four loops on the same base, LoRA config, shard, batch order and schedule (see train_bench.py, whose worker
pieces this reuses), each in a fresh subprocess so its peak RSS is its own:

* ``plain fp32`` — the hand-written transformers + PEFT loop, float32, full logits (the baseline);
* ``plain bf16`` — the same loop with the frozen base stored in bf16 and the forward under bf16 autocast;
* ``uniflow fp32`` — ``training.train_loop`` in float32 (answer-only LM head);
* ``uniflow bf16`` — ``training.train_loop`` with ``precision = "bf16"`` (base built in bf16, autocast,
  answer-only LM head; LoRA, projectors and AdamW state float32).

Printed: tokens/s (non-padding tokens), the ratios to ``plain fp32`` and ``plain bf16``, peak RSS and the
first/last loss of each loop (precision changes the numbers, not what is trained).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = ("plain-fp32", "plain-bf16", "uniflow-fp32", "uniflow-bf16")


def plain(args, dataset, precision: str) -> dict:
    from train_bench import plain_loop

    return plain_loop(args, dataset, precision)


def uniflow(args, dataset, precision: str) -> dict:
    from train_bench import batch_order, settings_for
    from uniflow_cli.compute import precision_dtype
    from uniflow_cli.models import collate, load_model
    from uniflow_cli.settings import LoraSettings, TrainSettings
    from uniflow_cli.training import train_loop

    model = load_model(settings_for(args.preset), LoraSettings(), seed=0, dtype=precision_dtype(precision))
    steps = args.warmup + args.steps
    cfg = TrainSettings(steps=steps, batch_size=args.batch_size, lr=args.lr, stages="joint", seed=args.seed, warmup_ratio=0.0, precision=precision)
    times: list[float] = []
    stats = train_loop(model, dataset, cfg, method="fedA2", seed=args.seed, device="cpu", on_step=lambda *_: times.append(time.perf_counter()))
    tokens = [int(collate([dataset[i] for i in picks], model)["attention_mask"].sum()) for picks in batch_order(len(dataset), args.seed, steps, args.batch_size)]
    return {"times": times, "tokens": tokens, "losses": stats.losses}


def worker(args) -> None:
    import torch

    from uniflow_cli.data.build import load_split

    torch.set_num_threads(args.threads)
    dataset = load_split(args.shard)
    impl, precision = args.variant.split("-")
    result = (plain if impl == "plain" else uniflow)(args, dataset, precision)
    times, tokens = result.pop("times"), result.pop("tokens")
    seconds = times[-1] - times[args.warmup - 1]
    timed = sum(tokens[args.warmup :])
    result.update(tokens_per_s=timed / seconds, s_per_step=seconds / args.steps,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def run_worker(args, variant: str, shard: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--preset", args.preset, "--shard", str(shard), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--lr", str(args.lr)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant}/{shard.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="smol")
    parser.add_argument("--modalities", default="text,image,audio")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from train_bench import build_shards

    report: dict = {"load_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    modalities = [m for m in args.modalities.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants {bad[0]} is not one of {', '.join(VARIANTS)}")
    print("| preset | batch | " + " | ".join(f"{v} tokens/s" for v in variants) + " | " + " | ".join(f"{v} peak RSS" for v in variants) + " | first loss |")
    print("|---|---|" + "---:|" * (2 * len(variants)) + "---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="uniflow-precision-bench-") as tmp:
        shards = build_shards(Path(tmp), modalities, n=max(8, args.batch_size * 2))
        for preset in [p for p in args.presets.split(",") if p]:
            args.preset = preset
            for modality in modalities:
                tries: dict[str, list[dict]] = {v: [] for v in variants}
                for r in range(args.repeats):  # interleaved, order reversed every other repeat; best of each
                    for variant in variants if r % 2 == 0 else variants[::-1]:
                        tries[variant].append(run_worker(args, variant, shards[modality]))
                best = {v: max(t, key=lambda x: x["tokens_per_s"]) for v, t in tries.items()}
                report["runs"].append({"preset": preset, "modality": modality, "best": best, "tries": tries})
                print(f"| {preset} | {modality} ×{args.batch_size} | " + " | ".join(f"{best[v]['tokens_per_s']:.0f}" for v in variants) + " | "
                      + " | ".join(f"{best[v]['peak_rss_mib']:.0f} MiB" for v in variants) + " | "
                      + ", ".join(f"{v} {best[v]['losses'][0]:.4f}" for v in variants) + " |", flush=True)
    report["load_after"] = os.getloadavg()
    print(f"\nload average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
