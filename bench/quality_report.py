"""Quality targets on real data, read from the results store (run the studies first).

    tunebench run bench/quality/sst2.yaml
    tunebench run bench/quality/banking77.yaml
    python bench/quality_report.py [STORE_DIR]

Targets: SST-2 full fine-tuning >= 0.87 accuracy (train on ../shared train, score on ../shared dev),
LoRA within 2 points of full, zero-shot and few-shot above chance; BANKING77 (80/20 split of ../shared
train) full fine-tuning >= 0.88 accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunebench.analysis.leaderboard import leaderboard
from tunebench.errors import StoreError
from tunebench.store import Store

ROOT = Path(__file__).resolve().parents[1]


def best(board: list[dict], strategy: str) -> dict | None:
    rows = [e for e in board if e["strategy"] == strategy]
    return max(rows, key=lambda e: e["quality_mean"]) if rows else None


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tunebench-runs"  # the quality studies' store
    try:
        store = Store(root, create=False)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = True
    for study, chance in (("quality-sst2", 0.5), ("quality-banking77", 1 / 77)):
        rows = store.trials(study)
        if not rows:
            print(f"{study}: no results; run tunebench run bench/quality/{study.split('-')[1]}.yaml")
            ok = False
            continue
        board = leaderboard(rows)
        print(f"\n{study} (test accuracy; chance {chance:.3f})")
        for e in board:
            print(f"  {e['label']:<55} n={e['train_size']:<6} acc={e['quality_mean']:.4f} "
                  f"{e['secondary']}={e['secondary_mean']:.4f} train={e['train_seconds']:.0f}s")
        full = best(board, "full")
        checks = []
        if study == "quality-sst2":
            lora = best(board, "lora")
            checks.append(("full >= 0.87", full and full["quality_mean"] >= 0.87))
            checks.append(("lora within 2 points of full",
                           full and lora and lora["quality_mean"] >= full["quality_mean"] - 0.02))
            for s in ("zero_shot", "few_shot"):
                e = best(board, s)
                checks.append((f"{s} above chance", e and e["quality_mean"] > chance))
        else:
            checks.append(("full >= 0.88", full and full["quality_mean"] >= 0.88))
        for name, passed in checks:
            print(f"  [{'PASS' if passed else 'FAIL'}] {name}")
            ok = ok and bool(passed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
