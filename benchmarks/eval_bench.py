"""Evaluation throughput: questions/s of the teacher-forced + batched greedy pass, by batch size and precision.

    .venv/bin/python benchmarks/eval_bench.py                        # smol, 24 text-qa test questions
    .venv/bin/python benchmarks/eval_bench.py --questions 48 --batch-sizes 1,8,16 --precisions fp32,bf16

One process, one model per precision; for each batch size the same questions go through
``evaluation._generate`` — the pass ``uniflow evaluate`` runs (teacher-forced answer tokens through the
answer-only LM head, then HF ``generate`` with the KV cache on a left-padded batch) — timed after one
untimed warm-up batch. Printed: questions/s, the ratio to batch size 1, and whether the predictions are
the same at every batch size (left padding must not change a greedy answer beyond float rounding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from uniflow_cli.compute import precision_dtype
    from uniflow_cli.data.builtin import text_qa
    from uniflow_cli.data.source import TEST
    from uniflow_cli.evaluation import EvalOptions, _generate
    from uniflow_cli.models import ModelSettings, load_model
    from uniflow_cli.settings import LoraSettings

    torch.set_num_threads(args.threads)
    source = text_qa()
    test_rows = [i for i, role in enumerate(source.roles) if role == TEST][: args.questions]
    rows = source.fetch(test_rows, None)
    print(f"# {args.preset}, {len(rows)} text-qa test questions, max_new_tokens {args.max_new_tokens}, {args.threads} thread(s)")
    print("| precision | batch | questions/s | × batch 1 | same answers as batch 1 |")
    print("|---|---:|---:|---:|---|")
    for precision in args.precisions.split(","):
        model = load_model(ModelSettings(preset=args.preset, modalities=[]), LoraSettings(), seed=0, dtype=precision_dtype(precision))
        base_rate, base_answers = None, None
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            options = EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=batch, device="cpu", precision=precision)
            _generate(model, {"text": rows[:batch]}, options, None, 0)  # warm-up
            started = time.perf_counter()
            records = _generate(model, {"text": rows}, options, None, 0)
            rate = len(rows) / (time.perf_counter() - started)
            answers = [r["prediction"] for r in records]
            base_rate, base_answers = (rate, answers) if base_rate is None else (base_rate, base_answers)
            same = sum(a == b for a, b in zip(answers, base_answers))
            print(f"| {precision} | {batch} | {rate:.2f} | {rate / base_rate:.2f}× | {same}/{len(rows)} |", flush=True)


if __name__ == "__main__":
    main()
