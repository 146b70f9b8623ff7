"""Groups evidence on real data: SST-2 phrases grouped by length (short 1-3 words, medium 4-9, long 10+).

SST-2 has no group column and ../shared/data must not be copied into the repository, so this script writes a
seeded sample with a `length` column, and a study over it, to OUT (default: tunebench-runs/sst2-length, which git
ignores). Then:

    python bench/sst2_length_groups.py
    tunebench run tunebench-runs/sst2-length/study.yaml
    tunebench show sst2-length --groups --store tunebench-runs
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "sst2"

STUDY = """\
# Written by bench/sst2_length_groups.py: SST-2 phrases grouped by their length in words.
name: sst2-length
task:
  type: classification
  data: {{train: train.tsv, test: test.tsv}}
  split: {{dev: 0.1, seed: 0}}
  text: sentence
  label: label
  labels: {{0: negative, 1: positive}}
  groups: [length]
model: default
training: {{max_length: 64, batch_size: 32}}
strategies:
  - zero_shot: {{label_templates: ["This movie review is {{{{ label }}}}."]}}
  - few_shot: {{shots: 8}}
  - linear_probe: {{epochs: 10}}
  - full: {{epochs: 2, lr: 1.0e-4}}
seeds: [0, 1]
train_sizes: [all]
store: {store}
"""


def length_group(sentence: str) -> str:
    n = len(sentence.split())
    return "short (1-3 words)" if n <= 3 else "medium (4-9)" if n <= 9 else "long (10+)"


def read(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def write(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
        w.writerow(["sentence", "label", "length"])
        w.writerows([[s, y, length_group(s)] for s, y in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tunebench-runs" / "sst2-length")
    ap.add_argument("--train", type=int, default=800, help="rows sampled from SST-2 train")
    ap.add_argument("--test", type=int, default=1500, help="rows sampled from SST-2 dev (the test split here)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    train = [r for r in read(DATA / "train.tsv") if r[0].strip()]
    test = [r for r in read(DATA / "dev.tsv") if r[0].strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.tsv", rng.sample(train, args.train))
    write(args.out / "test.tsv", rng.sample(test, args.test))
    store = Path("..") if args.out.parent.name == "tunebench-runs" else args.out / "runs"
    (args.out / "study.yaml").write_text(STUDY.format(store=store), encoding="utf-8")
    print(f"wrote {args.out}/train.tsv ({args.train}), test.tsv ({args.test}), study.yaml")


if __name__ == "__main__":
    main()
