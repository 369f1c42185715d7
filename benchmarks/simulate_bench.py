"""Seconds per round: ``uniflow simulate`` against the same rounds as separate commands, side by side.

    .venv/bin/python benchmarks/simulate_bench.py                  # smol, 3 text-qa clients × 10 steps, 2 rounds
    .venv/bin/python benchmarks/simulate_bench.py --quick          # tiny-random (a minute)
    .venv/bin/python benchmarks/simulate_bench.py --preset minilm  # the NLU setting: rotten-tomatoes, 3 clients
    .venv/bin/python benchmarks/simulate_bench.py --rounds 3 --clients 5 --steps 20 --method fedex

One workspace is made once (``uniflow init`` + ``uniflow partition -d text-qa --clients text:K``) and copied
twice. The file-drop side runs what ``examples/run_rounds.sh`` runs, each command a fresh process: per
round, ``uniflow local-train --client k --round t`` for every client, then ``uniflow aggregate --round t``.
The simulate side is one process, ``uniflow simulate --rounds R --json``; its seconds per round are its
whole wall time over R (process start and the one model load included), and the in-process split
(training, aggregation, model builds) comes from its JSON. Both sides run with the same
``UNIFLOW_THREADS``, and the bench checks that their globals' tensor files are byte-identical (their
uniflow.json differ only in the workspace paths they record). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def uniflow() -> list[str]:
    """The console script beside this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).with_name("uniflow")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "uniflow_cli.cli.app"]


def call(*args: object, env: dict[str, str]) -> tuple[float, str]:
    """Run one uniflow command in a fresh process; (its wall seconds, its stdout)."""
    started = time.perf_counter()
    done = subprocess.run([*uniflow(), *map(str, args)], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"uniflow {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def make_template(root: Path, args: argparse.Namespace, env: dict[str, str]) -> Path:
    ws = root / "template"
    # minilm is the NLU setting (the figure): a rotten-tomatoes classifier; the others answer text-qa.
    task = ("--task", "classify", "--labels", "rotten-tomatoes") if args.preset == "minilm" else ("--modalities", "")
    call("init", ws, "--preset", args.preset, *task, "--method", args.method, "--steps", args.steps,
         "--batch-size", args.batch_size, "--seed", 0, env=env)
    call("partition", "-d", data_for(args), "--clients", f"text:{args.clients}", "--train-per-client", args.train_per_client,
         "--test-per-modality", 8, "--seed", 0, "-w", ws, env=env)
    return ws


def data_for(args: argparse.Namespace) -> str:
    return "rotten-tomatoes" if args.preset == "minilm" else "text-qa"


def file_drop(ws: Path, args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, float]]:
    rounds = []
    for t in range(1, args.rounds + 1):
        train = sum(call("local-train", "--client", k, "-w", ws, "--round", t, env=env)[0] for k in range(args.clients))
        aggregate = call("aggregate", "--round", t, "-w", ws, "--min-clients", 1, env=env)[0]
        rounds.append({"round": t, "train_s": train, "aggregate_s": aggregate, "total_s": train + aggregate})
    return rounds


def simulated(ws: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, object]:
    seconds, stdout = call("simulate", "-w", ws, "--rounds", args.rounds, "--json", env=env)
    payload = json.loads(stdout)
    return {"wall_s": seconds, "in_process_s": payload["seconds"], "model_builds": payload["model_builds"],
            "build_s": payload["build_seconds"],
            "rounds": [{"round": r["round"], "train_s": round(r["train_seconds"], 2), "aggregate_s": round(r["aggregate_seconds"], 2)}
                       for r in payload["published"]]}


def train_loop_seconds(ws: Path, t: int) -> float:
    """The seconds the clients' training loops took in round ``t`` (each drop records its own)."""
    drops = sorted((ws / "rounds" / str(t) / "clients").iterdir())
    return round(sum(json.loads((d / "uniflow.json").read_text())["extra"]["train"]["seconds"] for d in drops), 2)


def same_globals(a: Path, b: Path, rounds: int) -> bool:
    names = ("adapter_model.safetensors", "residual.safetensors", "adapter_config.json")
    for t in range(1, rounds + 1):
        for name in names:
            x, y = a / "rounds" / str(t) / "global" / name, b / "rounds" / str(t) / "global" / name
            if x.is_file() != y.is_file() or (x.is_file() and x.read_bytes() != y.read_bytes()):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny-random preset instead of smol")
    parser.add_argument("--preset", default=None, help="smol (default; text-qa), minilm (rotten-tomatoes classification) or tiny-random")
    parser.add_argument("--method", default="fedA2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-per-client", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.preset = args.preset or ("tiny-random" if args.quick else "smol")
    env = {**os.environ, "UNIFLOW_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads), "SOURCE_DATE_EPOCH": "0"}
    env.pop("UNIFLOW_WORKSPACE", None)
    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    with tempfile.TemporaryDirectory(prefix="simulate-bench-") as tmp:
        root = Path(tmp)
        template = make_template(root, args, env)
        shutil.copytree(template, root / "commands")
        shutil.copytree(template, root / "simulate")
        commands = file_drop(root / "commands", args, env)
        sim = simulated(root / "simulate", args, env)
        identical = same_globals(root / "commands", root / "simulate", args.rounds)
        for side, rounds in (("commands", commands), ("simulate", sim["rounds"])):
            for r in rounds:  # what the training loops took; the rest is process starts, model builds, reading, writing
                r["train_loop_s"] = train_loop_seconds(root / side, r["round"])
    per_round_commands = sum(r["total_s"] for r in commands) / args.rounds
    per_round_simulate = sim["wall_s"] / args.rounds
    loop_s = {"commands": sum(r["train_loop_s"] for r in commands) / args.rounds,
              "simulate": sum(r["train_loop_s"] for r in sim["rounds"]) / args.rounds}
    print(json.dumps({
        "setting": {"preset": args.preset, "method": args.method, "rounds": args.rounds, "clients": args.clients, "steps": args.steps,
                    "batch_size": args.batch_size, "train_per_client": args.train_per_client, "threads": args.threads, "data": data_for(args)},
        "commands": {"per_round_s": round(per_round_commands, 2), "rounds": [{k: round(v, 2) for k, v in r.items()} for r in commands]},
        "simulate": {"per_round_s": round(per_round_simulate, 2), **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in sim.items()}},
        # Per round, what is not the clients' training loops: process starts, model builds, reading and publishing, aggregating.
        "overhead_per_round_s": {"commands": round(per_round_commands - loop_s["commands"], 2), "simulate": round(per_round_simulate - loop_s["simulate"], 2)},
        "speedup": round(per_round_commands / per_round_simulate, 2),
        "globals_identical": identical,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
