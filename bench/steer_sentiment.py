"""Does head steering change generated text? ITI fitted on a sentiment JSONL, judged by a word list.

Fits steering on ``bench/data/sentiment.jsonl`` (30 positive and 30 negative sentences written for
this benchmark; the direction points to ``positive``), then continues neutral prompts greedily at
α = −A, 0 and +A, with the random-head control at +A. The judge is deliberately simple and
printed with the texts so a reader can check it: the count of words from :data:`POSITIVE` minus
the count from :data:`NEGATIVE` in each continuation (lower-cased, punctuation stripped). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/steer_sentiment.py --model default --k 16 --alpha 15
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from benchlib import quiet

POSITIVE = frozenset(
    [
        "good",
        "great",
        "wonderful",
        "happy",
        "love",
        "loved",
        "lovely",
        "excellent",
        "amazing",
        "beautiful",
        "best",
        "delightful",
        "joy",
        "joyful",
        "perfect",
        "fantastic",
        "brilliant",
        "kind",
        "pleasant",
        "nice",
        "enjoy",
        "enjoyed",
        "glad",
        "fun",
        "warm",
        "friendly",
        "delicious",
    ]
)
NEGATIVE = frozenset(
    [
        "bad",
        "terrible",
        "awful",
        "sad",
        "hate",
        "hated",
        "horrible",
        "worst",
        "ugly",
        "boring",
        "miserable",
        "angry",
        "disappointed",
        "poor",
        "nasty",
        "dreadful",
        "disgusting",
        "rude",
        "dirty",
        "broken",
        "failure",
        "wrong",
        "annoying",
        "gloomy",
        "cold",
    ]
)
PROMPTS = (
    "The restaurant on the corner",
    "My trip to the city was",
    "The new teacher at our school",
    "Yesterday the weather",
    "I watched a movie last night and it",
    "The package arrived and",
)


def judge(text: str) -> int:
    """Return (# positive words) − (# negative words) in ``text``."""
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=15.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    quiet()
    import headatlas as ha

    loaded = ha.load(args.model)
    start = time.perf_counter()
    data = Path(__file__).parent / "data" / "sentiment.jsonl"
    steering = ha.steer.fit(loaded, task=str(data), k=args.k, alpha=args.alpha)
    fit_s = time.perf_counter() - start
    runs = {"α=-A": -args.alpha, "α=0": 0.0, "α=+A": args.alpha}
    scores: dict[str, list[int]] = {name: [] for name in [*runs, "random α=+A"]}
    texts = []
    for prompt in PROMPTS:
        row = {"prompt": prompt}
        for name, alpha in runs.items():
            row[name] = ha.steer.generate(loaded, steering, prompt, alpha, args.max_new_tokens)
            scores[name].append(judge(row[name]))
        with ha.steer.applied(loaded, steering, args.alpha, control=True):
            row["random α=+A"] = ha.steer.generate(loaded, None, prompt, None, args.max_new_tokens)
        scores["random α=+A"].append(judge(row["random α=+A"]))
        texts.append(row)
    print(json.dumps(texts, indent=1, ensure_ascii=False))
    print(
        json.dumps(
            {
                "model": loaded.info.name,
                "k": args.k,
                "alpha": args.alpha,
                "heads": [f"L{la}H{h}" for la, h in steering.shift.heads],
                "val_accuracy": steering.val_accuracy,
                "fit_seconds": round(fit_s, 1),
                "judge_sum": {name: sum(v) for name, v in scores.items()},
                "judge_per_prompt": scores,
            },
            indent=1,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
