"""Models benchmark: cold conversion of the embedded default, warm load of ``smol``, parameter counts
per stage, one training step, peak RSS.

    .venv/bin/python benchmarks/models_bench.py            # warm numbers (uses the existing cache)
    .venv/bin/python benchmarks/models_bench.py --cold     # also converts into a fresh temporary cache

Prints one JSON object. Figures go to docs/benchmarks.md ("## Models").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="time the conversion into an empty temporary cache")
    args = parser.parse_args()
    result: dict[str, object] = {}

    t = time.perf_counter()
    import torch

    from uniflow_cli.models import ModelSettings, collate, load_model, parameter_counts, set_trainable_stage
    from uniflow_cli.models import cache
    from uniflow_cli.models.presets import SMOL_PARTS, ensure_converted
    from uniflow_cli.workspace import LoraSettings

    result["import_s"] = round(time.perf_counter() - t, 2)
    result["torch_threads"] = torch.get_num_threads()

    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get(cache.CACHE_ENV)
            os.environ[cache.CACHE_ENV] = tmp
            try:
                for part, source in SMOL_PARTS.items():
                    t = time.perf_counter()
                    ensure_converted(source)
                    result[f"cold_convert_{part}_s"] = round(time.perf_counter() - t, 1)
            finally:
                if old is None:
                    del os.environ[cache.CACHE_ENV]
                else:
                    os.environ[cache.CACHE_ENV] = old

    for part, source in SMOL_PARTS.items():
        ensure_converted(source)  # make sure the warm numbers below are warm

    for label in ("tiny_random_first_build_s", "tiny_random_build_s"):  # first one pays transformers' lazy imports
        t = time.perf_counter()
        tiny = load_model(ModelSettings(preset="tiny-random"), LoraSettings(), seed=0)
        result[label] = round(time.perf_counter() - t, 3)
        del tiny

    cache._SHA_MEMO.clear()  # a fresh process re-hashes the sources and verifies the cache entries

    t = time.perf_counter()
    model = load_model(ModelSettings(preset="smol"), LoraSettings(), seed=0)
    result["smol_warm_load_s"] = round(time.perf_counter() - t, 1)
    result["smol_params"] = parameter_counts(model)

    import numpy as np
    from PIL import Image

    from uniflow_cli.data.media import encode_wav

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    wave = (0.3 * np.sin(np.arange(3 * 16000) / 8)).astype(np.float32)
    samples = [
        {"id": "i", "modality": "image", "question": "what color is the shape?", "answer": "blue", "image": image, "audio": None},
        {"id": "a", "modality": "audio", "question": "", "answer": "a circle", "image": None, "audio": {"bytes": encode_wav(wave), "path": None}},
    ] * 2
    batch = collate(samples, model)
    for stage in ("encoder", "llm"):
        set_trainable_stage(model, stage)
        times = []
        for _ in range(3):
            model.zero_grad()
            t = time.perf_counter()
            model(batch).loss.backward()
            times.append(time.perf_counter() - t)
        result[f"smol_step_{stage}_batch4_s"] = round(min(times), 2)
    gen = collate(samples[:2], model, train=False)
    t = time.perf_counter()
    model.generate(gen, max_new_tokens=16)
    result["smol_generate_batch2_16tok_s"] = round(time.perf_counter() - t, 2)
    result["peak_rss_mb"] = round(_rss_mb())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
