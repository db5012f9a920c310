"""The CoNLST tables of docs/conlst.md ("Results and findings") from the committed cpu runs (numbers
the report does not pool).

    python -m benchmarks.conlst_tables [--runs benchmarks/results/cpu/runs]

Prints, per target language: zero-shot, + stage 1, full CoNLST and stage 2 alone (each run
against the zero-shot accuracy of the stage-0 model it read), the per-seed values, and the
pseudo-label accuracy per confidence bin before -> after stage 1 pooled over the seeds (all
pairs of a bin over all seeds, weighted by their number), with the mean number of pairs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.report import collect, lookup
from benchmarks.suites import CONLST_CPU_LANGS


def ms(vals: list[float]) -> str:
    return "-" if not vals else f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="benchmarks/results/cpu/runs")
    data = collect(Path(ap.parse_args(argv).runs))

    def per_seed(run_id: str, path: str) -> dict[int, float]:
        return {s["seed"]: v for s in data.get(run_id, []) if (v := lookup(s["summary"], path)) is not None}

    cols = {}  # (lang, column) -> seed -> value
    for lang in CONLST_CPU_LANGS:
        p, full, wo = f"per_lang.{lang}", f"conlst_cpu_{lang}_full", f"conlst_cpu_{lang}_wo_conl"
        for col, rid, path in (("zero-shot", full, f"{p}.stage0.acc"), ("+ stage 1", full, f"{p}.stage1.acc"),
                               ("full", full, f"{p}.best.acc"),
                               ("gain s1", full, f"{p}.stage1.acc - {p}.stage0.acc"),
                               ("gain full", full, f"{p}.best.acc - {p}.stage0.acc"),
                               ("zero-shot (w/o CoNL)", wo, f"{p}.stage0.acc"), ("stage 2 only", wo, f"{p}.best.acc"),
                               ("gain s2 only", wo, f"{p}.best.acc - {p}.stage0.acc")):
            cols[lang, col] = per_seed(rid, path)
    names = list(dict.fromkeys(c for _, c in cols))
    print("| target | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for lang in CONLST_CPU_LANGS:
        print(f"| {lang} | " + " | ".join(ms(list(cols[lang, c].values())) for c in names) + " |")
    avg = []
    for c in names:  # per seed, the mean over languages (seeds that every language has)
        seeds = set.intersection(*(set(cols[lang, c]) for lang in CONLST_CPU_LANGS))
        avg.append(ms([statistics.fmean(cols[lang, c][s] for lang in CONLST_CPU_LANGS) for s in sorted(seeds)]))
    print("| avg | " + " | ".join(avg) + " |\n")
    for lang in CONLST_CPU_LANGS:
        print(lang, "per seed:", {c: {s: round(v, 1) for s, v in cols[lang, c].items()}
                                  for c in names[:3] + names[5:7]})
    print("\n| target | bin | acc before -> after (pooled over seeds) | pairs per seed before -> after |"
          "\n|---|---|---|---|")
    for lang in CONLST_CPU_LANGS:
        seeds = data.get(f"conlst_cpu_{lang}_full", [])
        for b in ("high", "mid", "low", "all"):
            row = []
            for st in (0, 1):
                q = f"per_lang.{lang}.bins.after_stage{st}.{b}"
                pairs = [(lookup(s["summary"], f"{q}.acc"), lookup(s["summary"], f"{q}.n") or 0) for s in seeds]
                n = sum(k for a, k in pairs if a is not None)
                row.append(("-" if not n else f"{sum(a * k for a, k in pairs if a is not None) / n:.1f}",
                            f"{statistics.fmean(k for _, k in pairs):.0f}" if pairs else "-"))
            print(f"| {lang} | {b} | {row[0][0]} -> {row[1][0]} | {row[0][1]} -> {row[1][1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
