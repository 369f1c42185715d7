"""The built-in datasets: ``easy-vqa`` (image QA), ``spoken-qa`` (audio QA), ``text-qa`` (text QA), and the
NLU classification sets ``snli`` and ``rotten-tomatoes`` (:mod:`uniflow_cli.data.nlu`).

All of them work offline. ``spoken-qa`` and ``text-qa`` share one deterministic pool of ~29k templated
questions with checkable answers (arithmetic, comparisons, counting, spelling, calendar facts) and
one fixed train/test split (by a hash of the question), so a text client never trains on a spoken
test question and vice versa.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from uniflow_cli.data.schema import make_row
from uniflow_cli.data.source import TEST, TRAIN, Progress, Source
from uniflow_cli.errors import MissingDependencyError

BUILTINS: tuple[str, ...] = ("easy-vqa", "spoken-qa", "text-qa", "snli", "rotten-tomatoes")

_WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum river mountain ocean forest desert island "
    "valley meadow garden castle bridge tower window door table chair pencil paper rocket planet comet star "
    "moon sun cloud rain snow storm thunder winter summer spring autumn morning evening tiger lion zebra "
    "rabbit turtle dolphin whale eagle parrot penguin kitten puppy horse donkey camel monkey giraffe "
    "elephant butterfly spider ant bee violin guitar piano drum trumpet flute doctor teacher farmer pilot "
    "singer painter baker bread butter cheese honey sugar coffee water juice yellow purple silver golden"
).split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = "january february march april may june july august september october november december".split()


@lru_cache(maxsize=1)
def question_pool() -> tuple[tuple[str, str, str], ...]:
    """Every templated ``(question, answer, kind)``, in a fixed order (no randomness: pure enumeration)."""
    q: list[tuple[str, str, str]] = []
    for a in range(100):
        for b in range(100):
            q.append((f"What is {a} plus {b}?", str(a + b), "addition"))
    for a in range(100):
        for b in range(a + 1):
            q.append((f"What is {a} minus {b}?", str(a - b), "subtraction"))
    for a in range(1, 21):
        for b in range(1, 21):
            q.append((f"What is {a} times {b}?", str(a * b), "multiplication"))
    for a in range(1, 100):
        for b in range(a + 1, 100):
            # which number is said first alternates, so "the first one" is never a shortcut
            x, y = (a, b) if (a + b) % 2 else (b, a)
            q.append((f"Which is larger, {x} or {y}?", str(b), "comparison"))
            q.append((f"Which is smaller, {y} or {x}?", str(a), "comparison"))
    for n in range(1000):
        q.append((f"What number comes after {n}?", str(n + 1), "counting"))
        if n > 0:
            q.append((f"What number comes before {n}?", str(n - 1), "counting"))
        q.append((f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", "parity"))
    for n in range(1, 101):
        q.append((f"What is double {n}?", str(2 * n), "doubling"))
        q.append((f"What is half of {2 * n}?", str(n), "halving"))
    for w in _WORDS:
        q.append((f"How many letters are in the word {w}?", str(len(w)), "spelling"))
        q.append((f"What is the first letter of the word {w}?", w[0], "spelling"))
        q.append((f"What is the last letter of the word {w}?", w[-1], "spelling"))
    for names, what in ((_DAYS, "day"), (_MONTHS, "month")):
        for i, name in enumerate(names):
            q.append((f"Which {what} comes after {name}?", names[(i + 1) % len(names)], "calendar"))
            q.append((f"Which {what} comes before {name}?", names[i - 1], "calendar"))
    return tuple(q)


def hash_role(text: str) -> int:
    """TEST for ~20 % of texts, else TRAIN: the split of a dataset that has none (text-qa, rotten-tomatoes).

    A content hash, not an RNG: the split is the same for every seed, for text and speech alike, and a text
    that occurs twice is on one side only."""
    return TEST if hashlib.sha256(text.encode()).digest()[0] % 5 == 0 else TRAIN


@lru_cache(maxsize=1)
def _pool_roles() -> np.ndarray:
    return np.array([hash_role(t) for t, _a, _k in question_pool()], dtype=np.int8)


def _voice_for(text: str, seed: int) -> tuple[str, int]:
    from uniflow_cli.data.speech import SPEEDS, VOICES

    h = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return VOICES[h[0] % len(VOICES)], SPEEDS[h[1] % len(SPEEDS)]


def text_qa(seed: int = 0) -> Source:
    pool = question_pool()

    def fetch(indices: Sequence[int], progress: Progress | None = None) -> list[dict]:
        rows = []
        for i in indices:
            text, answer, _kind = pool[int(i)]
            rows.append(make_row(id=f"text-qa-{int(i)}", modality="text", question=text, answer=answer))
            if progress:
                progress(1)
        return rows

    return Source(
        name="text-qa",
        modality="text",
        kind="builtin",
        questions=[t for t, _a, _k in pool],
        answers=[a for _t, a, _k in pool],
        roles=_pool_roles().copy(),
        fetch=fetch,
        label_columns={"kind": [k for _t, _a, k in pool]},
    )


def spoken_qa(seed: int = 0, *, workers: int | None = None) -> Source:
    """Audio QA: each question spoken by a voice and speed chosen from ``seed`` and the question text."""
    from uniflow_cli.data import speech

    pool = question_pool()

    def fetch(indices: Sequence[int], progress: Progress | None = None) -> list[dict]:
        items = []
        for i in indices:
            text = pool[int(i)][0]
            items.append((text, *_voice_for(text, seed)))
        clips = speech.synthesise(items, workers=workers, progress=progress)
        return [
            make_row(id=f"spoken-qa-{int(i)}", modality="audio", question=pool[int(i)][0], answer=pool[int(i)][1], audio_bytes=clip)
            for i, clip in zip(indices, clips)
        ]

    base = text_qa(seed)
    base.name, base.modality, base.fetch = "spoken-qa", "audio", fetch
    return base


def _easy_vqa_module():
    try:
        import easy_vqa
    except ImportError as exc:
        raise MissingDependencyError(
            "the easy-vqa package is not installed (built-in dataset easy-vqa)", fix="pip install --no-deps easy-vqa==1.0"
        ) from exc
    return easy_vqa


def _vqa_kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in ("circle", "rectangle", "triangle"):
        return "shape"
    return "color"


def easy_vqa(seed: int = 0) -> Source:
    """Image QA from the easy-vqa package, keeping its real train/test split (disjoint images)."""
    ev = _easy_vqa_module()
    tr_q, tr_a, tr_img = ev.get_train_questions()
    te_q, te_a, te_img = ev.get_test_questions()
    paths = {("train", k): v for k, v in ev.get_train_image_paths().items()}
    paths.update({("test", k): v for k, v in ev.get_test_image_paths().items()})
    split = ["train"] * len(tr_q) + ["test"] * len(te_q)
    image_ids = list(tr_img) + list(te_img)
    questions, answers = list(tr_q) + list(te_q), list(tr_a) + list(te_a)

    def fetch(indices: Sequence[int], progress: Progress | None = None) -> list[dict]:
        rows = []
        for i in indices:
            i = int(i)
            data = Path(paths[(split[i], image_ids[i])]).read_bytes()  # the package's PNG, unchanged
            rows.append(
                make_row(
                    id=f"easy-vqa-{split[i]}-{i}", modality="image", question=questions[i], answer=answers[i], image_bytes=data
                )
            )
            if progress:
                progress(1)
        return rows

    return Source(
        name="easy-vqa",
        modality="image",
        kind="builtin",
        questions=questions,
        answers=answers,
        roles=np.array([TRAIN] * len(tr_q) + [TEST] * len(te_q), dtype=np.int8),
        fetch=fetch,
        label_columns={"kind": [_vqa_kind(a) for a in answers]},
    )


def load_builtin(name: str, seed: int = 0) -> Source:
    from uniflow_cli.data import nlu  # imported here: nlu uses this module's hash_role

    if name in nlu.NLU_BUILTINS:
        return nlu.load_nlu(name, seed)
    return {"easy-vqa": easy_vqa, "spoken-qa": spoken_qa, "text-qa": text_qa}[name](seed)
