#!/usr/bin/env python3
"""A shared-system-prompt workload for `switchyard bench --dataset`: every prompt is one of
SYSTEMS system prompts (about WORDS words each) followed by a question of its own, so most of
each prompt is a prefix some other request shares. Deterministic for a given --seed.

    scripts/prefix_cache_workload.py --systems 12 --questions 20 --words 120 --out shared.jsonl
"""
import argparse
import json
import random

WORDS = (
    "the river morning train station city window history field house town children teacher "
    "museum ship map world picture valley question answer part problem village forest baker "
    "bread country traveller story place computer text model data size care fact"
).split()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=int, default=12, help="distinct system prompts")
    p.add_argument("--questions", type=int, default=20, help="questions per system prompt")
    p.add_argument("--words", type=int, default=120, help="words per system prompt")
    p.add_argument("--output-len", type=int, default=16, help="tokens generated per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for s in range(a.systems):
            system = f"System {s}: " + " ".join(rng.choice(WORDS) for _ in range(a.words))
            for q in range(a.questions):
                question = " ".join(rng.choice(WORDS) for _ in range(8))
                prompt = f"{system}\nQuestion {q}: {question}?"
                f.write(json.dumps({"prompt": prompt, "output_len": a.output_len}) + "\n")


if __name__ == "__main__":
    main()
