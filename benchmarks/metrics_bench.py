"""Time the evaluation metrics on CPU: BERTScore (embedded all-MiniLM-L6-v2, layer 6) load + scoring,
and BLEU / ROUGE-L / summarize on N prediction-reference pairs.

    .venv/bin/python benchmarks/metrics_bench.py [--pairs 200]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uniflow_cli import metrics  # noqa: E402

WORDS = "red blue green yellow circle square triangle rectangle the a is it shape colour image small large".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    preds = [_sentence(rng) for _ in range(args.pairs)]
    refs = [_sentence(rng) for _ in range(args.pairs)]

    t0 = time.perf_counter()
    metrics.bertscore(preds[:1], refs[:1], batch_size=args.batch_size)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.bertscore(preds, refs, batch_size=args.batch_size)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.bleu(preds, refs)
    metrics.rouge_l(preds, refs)
    t_text = time.perf_counter() - t0
    records = [
        {"modality": "image" if i % 2 else "audio", "prediction": p, "reference": r, "correct": 1, "total": 2}
        for i, (p, r) in enumerate(zip(preds, refs))
    ]
    t0 = time.perf_counter()
    metrics.summarize(records)
    t_sum = time.perf_counter() - t0
    print(f"pairs={args.pairs} batch_size={args.batch_size}")
    print(f"bertscore first call (load + 1 pair): {t_load:.2f} s")
    print(f"bertscore {args.pairs} pairs (cached scorer): {t_score:.2f} s")
    print(f"bleu + rouge_l {args.pairs} pairs: {t_text:.3f} s")
    print(f"summarize {args.pairs} records (2 modalities + overall): {t_sum:.3f} s")


if __name__ == "__main__":
    main()
