"""``uniflow ask``: the trained model's answer to a question (text, an image or a spoken question), as evaluate builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uniflow_cli.cli.examples import Example, epilog
from uniflow_cli.cli.options import (
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    RoundOpt,
    SeedOpt,
    ThreadsOpt,
    WorkspaceOpt,
    client_option,
    preset_option,
)

EXAMPLES: list[Example] = [
    ("inside a workspace: the latest published round answers (greedy, the paper's prompt)", 'uniflow ask "What is the capital of France?"'),
    ("an image question to round 3", 'uniflow ask --round 3 --image cat.png "What colour is the shape?"'),
    ("a spoken question (16 kHz or any rate soundfile reads)", 'uniflow ask --audio question.wav "Answer the spoken question."'),
    ("FedSA / FedDPA: client 2's personalised model", 'uniflow ask --round 3 --client 2 "What shape is it?"'),
    ("one question per line from stdin, answers as JSON", "cat questions.txt | uniflow ask - --json"),
    ("sampled instead of greedy (seeded: the same seed gives the same answer)", 'uniflow ask --sample --temperature 0.7 --seed 1 "Describe it."'),
    ("an explicit adapter (its recorded settings; or --preset / --workspace)", 'uniflow ask --adapter rounds/5/global "Two plus two?"'),
    ("a classify workspace: the predicted label (probabilities with --json)",
     'uniflow ask -w nlu "A man plays a guitar." --pair "A person makes music." --json'),
]
EPILOG = epilog(EXAMPLES, [
    ("The model is built as uniflow evaluate builds it (FedEx residuals and FLoRA merges of earlier rounds folded in, --client's "
    "private B or local adapter) and each question goes through evaluate's prompt and generation, on its own. A FedSA global "
    "alone has no B and is refused: give --client. See docs/export.md."),
])


def ask(
    question: Annotated[str, typer.Argument(help="The question; - reads one question per line from stdin (blank lines skipped).")],
    round: RoundOpt = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", "-a", help="An explicit adapter directory instead of a workspace round.",
                                                    show_default=False)] = None,
    preset: Annotated[str | None, preset_option("With --adapter: the base model (default: the adapter's recorded settings, else "
                                                   "--workspace's uniflow.toml).", show_default=False)] = None,
    client: Annotated[str | None, client_option("FedSA / FedDPA: client K's personalised model of the round.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="An image file: ask about it (the model needs an image encoder).",
                                                  show_default=False)] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="An audio file (WAV/FLAC/OGG): a spoken question or a clip to ask about.",
                                                  show_default=False)] = None,
    pair: Annotated[str | None, typer.Option("--pair", help="classify: the second text of a pair (e.g. an NLI hypothesis).",
                                                show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length in tokens at most.")] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="Sample the answer (temperature only) instead of the greedy one.")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="With --sample: the temperature (default 1).",
                                                         show_default=False)] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question with a trained model: greedy (or sampled) with the paper's prompt; a classify model gives its label."""
    from uniflow_cli.ask import AskOptions, AskRequest, Question, run_ask
    from uniflow_cli.cli.console import err
    from uniflow_cli.compute import set_threads

    set_threads(threads)
    texts = _stdin_questions() if question == "-" else [question]
    request = AskRequest(workspace=workspace, round=round, adapter=adapter, preset=preset, client=client)
    options = AskOptions(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, seed=0 if seed is None else seed,
                         device=device, precision=precision)
    with err.status("checking inputs") as status:
        result = run_ask(request, [Question(t, image=image, audio=audio, pair=pair) for t in texts], options,
                         on_status=lambda message: status.update(message))
    _print(result, as_json)


def _stdin_questions() -> list[str]:
    import sys

    return [line.strip() for line in sys.stdin if line.strip()]


def _print(result: Any, as_json: bool) -> None:
    from uniflow_cli.cli.console import notice, out, print_json

    for message in result.notices:
        notice(message)
    if as_json:
        print_json({"task": result.task, "round": result.round, "adapter": result.adapter, "method": result.method, "client": result.client,
                    "answers": result.answers, "notices": result.notices})
        return
    for answer in result.answers:  # an answer is the model's text: never rich markup
        out.print(answer["label"] if result.task == "classify" else answer["answer"], markup=False, emoji=False, soft_wrap=True)
