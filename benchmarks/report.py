"""Report: our mean +- std over seeds beside the paper's number, learning curves, and the claims.

    python -m benchmarks.report --suite cpu --runs benchmarks/results/cpu/runs --out benchmarks/results/cpu
    python -m benchmarks.report --suite cpu --readme README.md   # README's claims at a glance, from the committed runs

Reads every <run id>__seed<S>/summary.json (and metrics.jsonl for the curves) under --runs,
groups the seeds of each run id, and writes <out>/report.md, <out>/claims.md and one PNG of
learning curves per table. For each row: best-epoch and last-epoch metric as mean +- std
(sample std, n-1), the number of seeds, the paper's number with its table, the difference,
and a status. The paper's numbers come from benchmarks/reported.csv only.

Claims (suites.py, `Claim`) are judged on matched seeds only (CLAIM_RULE below says how), on
the last evaluation or on a checkpoint selected on a split the reported number never saw;
a best epoch chosen on the test set is labelled as an oracle and is never a claim.
`--readme` replaces the block between `<!-- claims:start -->` and `<!-- claims:end -->` of
that file with the claims table, one row per claim (per family of claims), and nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.suites import SUITES, Average, Claim, Run, Suite, View

HERE = Path(__file__).resolve().parent


def load_reported() -> dict[str, dict]:
    with open(HERE / "reported.csv", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def collect(runs_dir: Path) -> dict[str, list[dict]]:
    """run id -> list of {seed, summary, metrics} over the seeds found."""
    out: dict[str, list[dict]] = defaultdict(list)
    for s in sorted(Path(runs_dir).glob("*__seed*/summary.json")):
        run_id, seed = s.parent.name.rsplit("__seed", 1)
        metrics_path = s.parent / "metrics.jsonl"
        metrics = ([json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
                   if metrics_path.exists() else [])
        out[run_id].append({"seed": int(seed), "summary": json.loads(s.read_text()), "metrics": metrics})
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def lookup(summary: dict, path: str):
    """summary["a"]["b"]["c"] for path "a.b.c"; None when any part is missing. "x.y - u.v" is the
    difference of two paths of the same summary (e.g. a gain over the run's own baseline)."""
    if " - " in path:
        a, b = (lookup(summary, q.strip()) for q in path.split(" - ", 1))
        return None if a is None or b is None else a - b
    node = summary
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def views_of(run: Run) -> tuple[View, ...]:
    """The report rows of a run: its views, or one row of best.<metric> / final.<metric>."""
    return run.views or (View(run.metric, f"best.{run.metric}", f"final.{run.metric}", run.row, run.higher_is_better),)


def values(seeds: list[dict], path: str) -> dict[int, float]:
    """seed -> the number at `path` of that seed's summary (seeds without it left out)."""
    return {s["seed"]: v for s in seeds if (v := lookup(s["summary"], path)) is not None}


def stats(best: dict[int, float], last: dict[int, float], n: int) -> dict:
    return {"best": mean_std(list(best.values())), "last": mean_std(list(last.values())), "n": n,
            "best_values": list(best.values()), "last_values": list(last.values())}


def row_stats(run: Run, seeds: list[dict], view: View | None = None) -> dict:
    v = view or views_of(run)[0]
    best, last = values(seeds, v.best), values(seeds, v.last)
    return stats(best, last, len(set(best) | set(last)))


def average_seed_values(avg: Average, by_id: dict[str, Run], data: dict) -> tuple[dict[int, float], dict[int, float]]:
    """Per seed (the seeds that every run has), the mean of the runs' primary numbers: (best, last)."""
    per_run = []
    for rid in avg.runs:
        vs = views_of(by_id[rid])
        v = next(x for x in vs if x.name == avg.view) if avg.view else vs[0]
        per_run.append((values(data.get(rid, []), v.best), values(data.get(rid, []), v.last)))
    seeds = set.intersection(*(set(b) & set(f) for b, f in per_run)) if per_run else set()
    best = {s: sum(b[s] for b, _ in per_run) / len(per_run) for s in sorted(seeds)}
    last = {s: sum(f[s] for _, f in per_run) / len(per_run) for s in sorted(seeds)}
    return best, last


def average_stats(avg: Average, by_id: dict[str, Run], data: dict) -> dict:
    """Per seed, the mean of the runs' primary numbers (seeds that every run has), then over seeds."""
    best, last = average_seed_values(avg, by_id, data)
    return stats(best, last, len(best))


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "-" if m != m else f"{m:.2f} ± {s:.2f}"


def status_of(suite: str, run: Run | View, stats: dict, paper: dict | None, expected_seeds: int) -> str:
    if stats["n"] == 0:
        return "not run"
    if stats["n"] < expected_seeds:
        return f"partial ({stats['n']}/{expected_seeds} seeds)"
    if paper is None:
        return "measured (no paper number)"
    if suite != "paper":
        return "different scale: not comparable"
    diff = stats["best"][0] - float(paper["value"])
    sign = 1 if run.higher_is_better else -1
    tol = max(2 * stats["best"][1], 1.0)
    if sign * diff >= -tol:
        return "reproduced (within tolerance)" if abs(diff) <= tol else "better than paper"
    return "below paper"


def plot_curves(group: str, runs: list[Run], data: dict, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run in runs:
        seeds = data.get(run.id, [])
        key = run.metric if run.curve == "" else run.curve
        if key is None:
            continue
        curves = [[(r.get("epoch") or r["step"], r[key]) for r in s["metrics"] if key in r] for s in seeds]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [c[i][0] for i in range(n) for c in curves[:1]]
        ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        lo = [min(c[i][1] for c in curves) for i in range(n)]
        hi = [max(c[i][1] for c in curves) for i in range(n)]
        (line,) = ax.plot(xs, ys, label=f"{run.id} (n={len(curves)})")
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel(", ".join(sorted({r.metric if r.curve == "" else r.curve for r in runs if r.curve is not None})))
    ax.set_title(group + " (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = "curves_" + "".join(ch if ch.isalnum() else "_" for ch in group.lower()).strip("_") + ".png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def precisions(seeds: list[dict]) -> str:
    """The precision each seed's run used, from summary.json. Runs made before `--precision auto`
    chose bf16 on CPUs record none: on CPU they all ran in fp32 (what `auto` meant then)."""
    return ", ".join(sorted({s["summary"].get("precision", "fp32") for s in seeds})) or "-"


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- header
def _commit_dates(hashes: list[str]) -> dict[str, tuple[int, str]]:
    """short hash -> (commit time, YYYY-MM-DD) from git; hashes git does not know are left out."""
    out: dict[str, tuple[int, str]] = {}
    for group in ([hashes], [[h] for h in hashes]):  # all at once; one by one if one is unknown
        for hs in group:
            r = subprocess.run(["git", "show", "-s", "--format=%H %ct %cs", *hs], cwd=HERE, capture_output=True,
                               text=True)
            if r.returncode:
                continue
            for line in r.stdout.splitlines():
                full, t, day = line.split()
                for h in hs:
                    if full.startswith(h):
                        out[h] = (int(t), day)
        if len(out) == len(hashes):
            break
    return out


def commit_line(summaries: list[dict]) -> str:
    """One line: the first and last commit the runs were made at (by commit date when git knows
    them, else by name), how many commits, how many with uncommitted changes."""
    names = [s.get("git_commit") or "unknown" for s in summaries]
    if not names:
        return "Runs made at commits: - (no runs)."
    dirty = {n for n in names if n.endswith("-dirty")}
    commits = sorted({n.removesuffix("-dirty") for n in names})
    dates = _commit_dates([c for c in commits if c != "unknown"])
    if dates and all(c in dates for c in commits):
        commits.sort(key=lambda c: dates[c][0])
        first, last = commits[0], commits[-1]
        span = f"`{first}` ({dates[first][1]}) .. `{last}` ({dates[last][1]}), by commit date"
    else:
        span = f"`{commits[0]}` .. `{commits[-1]}` (sorted by name: not all of them are in this git history)"
    return (f"Runs made at commits {span}: {len(commits)} commits, {len(dirty)} of them with uncommitted "
            f"changes (`-dirty`); each run's own commit is in its summary.json.")


def cpu_line(summaries: list[dict]) -> str:
    """One line: the machines (and CPU models, where summary.json records them) with their run counts."""
    counts: dict[str, int] = defaultdict(int)
    for s in summaries:
        counts[s.get("machine", "?") + (f", {s['cpu']}" if s.get("cpu") else ", CPU model not recorded")] += 1
    listed = "; ".join(f"{m} ({n} runs)" for m, n in sorted(counts.items(), key=lambda x: -x[1]))
    return "CPUs: " + (listed or "-") + "."


# ----------------------------------------------------------------------------- best: oracle or selected
ORACLE_BEST = "best (oracle: chosen on the test set)"
# Where each script's `best` evaluation is chosen. None: on the split it reports (an oracle).
BEST_SELECTED_ON = {"lacol.py": None, "scal.py": None, "uscal.py": "STS-B dev", "conlst.py": "English dev",
                    "msmo.py": "English dev"}


def best_label(runs: list[Run]) -> str:
    chosen = {BEST_SELECTED_ON.get(r.script, "?") for r in runs}
    if chosen == {None}:
        return ORACLE_BEST
    if len(chosen) == 1 and "?" not in chosen:
        return f"best (selected on {chosen.pop()})"
    return "best"


# ----------------------------------------------------------------------------- claims
CLAIM_RULE = (
    "Each claim reads *left > right*. It is judged on **matched seeds** only: the seeds that both sides "
    "have, the per-seed difference d = left − right, and the mean and sample std of d over those n seeds. "
    "**held**: n ≥ 2 and mean(d) > std(d); **did not hold**: n ≥ 2 and mean(d) < −std(d); **within noise**: "
    "n ≥ 2 and |mean(d)| ≤ std(d); **one seed only**: n = 1 (shown, not a claim); **not run**: no seed on "
    "both sides; **not testable at this scale**: the runs exist but hold no value for it (e.g. an empty "
    "confidence bin). A side that does not depend on the seed (an untrained model's evaluation, run once) "
    "meets every seed of the other. Claims read the last evaluation, or the checkpoint selected on a split "
    "that the reported number never saw (named with the claim); a best epoch chosen on the test set is an "
    "oracle and never a claim.")
VERDICTS = ("held", "did not hold", "within noise", "one seed only", "not run", "not testable at this scale")
ORACLE_CLAIM = "not a claim (best chosen on the test set)"


def side_values(name: str, path: str | None, which: str, by_id: dict, averages: dict, data: dict) -> dict[int, float]:
    """seed -> the number a claim reads for one side (a run, or an Average per seed)."""
    if name in averages:
        best, last = average_seed_values(averages[name], by_id, data)
        return last if which == "final" else best
    if path is None:  # the run's own metric (not its first view: uscal's first view is STS12)
        path = f"{'final' if which == 'final' else 'best'}.{by_id[name].metric}"
    return values(data.get(name, []), path)


def side_runs(name: str, averages: dict) -> tuple[str, ...]:
    return averages[name].runs if name in averages else (name,)


def _product(ids: list[str]) -> str | None:
    """"a_{x,y}_{1,2}" when the ids are exactly the product of their '_'-separated tokens."""
    toks = [i.split("_") for i in ids]
    if len({len(t) for t in toks}) != 1:
        return None
    cols = [list(dict.fromkeys(t[k] for t in toks)) for k in range(len(toks[0]))]
    n = 1
    for c in cols:
        n *= len(c)
    if n != len(ids):
        return None
    return "_".join(c[0] if len(c) == 1 else "{" + ",".join(c) + "}" for c in cols)


def _affix(ids: list[str]) -> str:
    """Common '_'-token prefix and suffix, the rest in braces: "a_b_{x,y_z}"."""
    toks = [i.split("_") for i in ids]
    pre = 0
    while all(len(t) > pre for t in toks) and len({t[pre] for t in toks}) == 1:
        pre += 1
    suf = 0
    while all(len(t) > pre + suf for t in toks) and len({t[-1 - suf] for t in toks}) == 1:
        suf += 1
    mids = ["_".join(t[pre:len(t) - suf]) for t in toks]
    parts = toks[0][:pre] + ["{" + ",".join(mids) + "}"] + (toks[0][len(toks[0]) - suf:] if suf else [])
    return "_".join(parts)


def brace(ids: list[str], sides: list[list[str]] | None = None) -> list[str]:
    """Short names for a set of run ids: ["msmo_cpu_{msmo,acs}_{fr,es,nl,ru}"], or one per side
    when that is shorter."""
    ids = list(dict.fromkeys(ids))
    if len(ids) == 1:
        return ids
    candidates = [[c] for c in (_product(ids), _affix(ids)) if c]
    if sides and len(sides) > 1:
        candidates.append([b for s in sides for b in brace(s)])
    return min(candidates, key=lambda c: len(", ".join(c)))


def seeds_suffix(seeds: list[int]) -> str:
    return "" if not seeds else f"__seed{seeds[0]}" if len(seeds) == 1 else "__seed{" + ",".join(map(str, seeds)) + "}"


def folders(names: list[str], seeds: list[int]) -> str:
    """`a__seed{0,1,2}`, `b__seed{0,1,2}`: the run folders a claim read."""
    return ", ".join(f"`{n}{seeds_suffix(seeds)}`" for n in names)


def judge_claim(c: Claim, by_id: dict, averages: dict, data: dict) -> dict:
    """The matched-seed verdict of one claim, with its numbers (CLAIM_RULE)."""
    left = side_values(c.left, c.left_path, c.which, by_id, averages, data)
    right = side_values(c.right, c.right_path, c.which, by_id, averages, data)
    if c.seedless == "left" and len(left) == 1:
        left = {s: next(iter(left.values())) for s in right}
    if c.seedless == "right" and len(right) == 1:
        right = {s: next(iter(right.values())) for s in left}
    seeds = sorted(set(left) & set(right))
    diffs = [left[s] - right[s] for s in seeds]
    n = len(seeds)
    m, sd = mean_std(diffs)
    runs = list(side_runs(c.left, averages)) + list(side_runs(c.right, averages))
    present = sorted(set.intersection(*({x["seed"] for x in data.get(r, [])} for r in runs
                                        if not (c.seedless and r in side_runs(getattr(c, c.seedless), averages)))))
    if c.which == "best" and not c.selected_on:
        verdict = ORACLE_CLAIM
    elif n == 0:
        verdict = "not testable at this scale" if present else "not run"
    elif n == 1:
        verdict = "one seed only"
    elif m > sd:
        verdict = "held"
    elif m < -sd:
        verdict = "did not hold"
    else:
        verdict = "within noise"
    sides = [list(side_runs(c.left, averages)), list(side_runs(c.right, averages))]

    def default(name: str) -> str:
        return "the per-seed mean of its runs" if name in averages else f"{c.which}.{by_id[name].metric}"

    base = "last evaluation" if c.which == "final" else (
        f"checkpoint selected on {c.selected_on}" if c.selected_on else ORACLE_BEST)
    if c.left_path is None and c.right_path is None:
        read = base
    elif c.left_path and c.right_path:
        read = f"`{c.left_path}` vs `{c.right_path}`"
    else:
        read = f"{base}: `{c.left_path or default(c.left)}` vs `{c.right_path or default(c.right)}`"
    return {"claim": c, "verdict": verdict, "n": n, "seeds": seeds, "diff": (m, sd), "diffs": diffs,
            "left": mean_std([left[s] for s in seeds]), "right": mean_std([right[s] for s in seeds]),
            "left_seeds": sorted(left), "right_seeds": sorted(right), "reads": read,
            "folders": folders(brace(runs, sides), seeds or present), "runs": runs, "sides": sides, "present": present}


def judge_claims(suite: Suite, data: dict) -> list[dict]:
    by_id = {r.id: r for r in suite.runs}
    averages = {a.id: a for a in suite.averages}
    return [judge_claim(c, by_id, averages, data) for c in suite.claims]


def diff_text(j: dict) -> str:
    m, sd = j["diff"]
    if j["n"] == 0:
        return "no value in the runs" if j["verdict"] == "not testable at this scale" else "-"
    if j["n"] == 1:
        return f"{m:+.2f} (seed {j['seeds'][0]})"
    return f"{m:+.2f} ± {sd:.2f} (n={j['n']})"


def claims_table(judged: list[dict]) -> list[str]:
    """Every claim, one row each (report.md, claims.md)."""
    lines = ["| claim | reads | verdict | left − right, matched seeds | left | right | run folders |",
             "|---|---|---|---|---|---|---|"]
    for j in judged:
        c = j["claim"]
        lines.append(f"| {c.text} | {j['reads']} | {j['verdict']} | {diff_text(j)} | {fmt(j['left'])} | "
                     f"{fmt(j['right'])} | {j['folders']} |")
    return lines


def _label(texts: list[str]) -> list[str]:
    """The words that tell a family's claims apart ("fr", "rte", "L_MS")."""
    words = [t.split() for t in texts]
    pre = 0
    while all(len(w) > pre for w in words) and len({w[pre] for w in words}) == 1:
        pre += 1
    suf = 0
    while all(len(w) > pre + suf for w in words) and len({w[-1 - suf] for w in words}) == 1:
        suf += 1
    return [" ".join(w[pre:len(w) - suf]).strip(",:;") or t for w, t in zip(words, texts)]


def _family_verdict(verdicts: list[str]) -> str:
    counts = {v: verdicts.count(v) for v in sorted(set(verdicts), key=lambda v: (VERDICTS + (v,)).index(v))}
    if len(counts) == 1:
        return f"{verdicts[0]} ({len(verdicts)} of {len(verdicts)})"
    return ", ".join(f"{v} {k}" for v, k in counts.items()) + f" (of {len(verdicts)})"


def glance_rows(judged: list[dict]) -> list[tuple[str, str, str, str]]:
    """README's rows: (claim, verdict, numbers, run folders); the claims of one family are one row."""
    order: dict[str, list[dict]] = {}
    for j in judged:
        order.setdefault(j["claim"].family or j["claim"].text, []).append(j)
    rows = []
    for name, js in order.items():
        if len(js) == 1:
            j = js[0]
            nums = diff_text(j)
            if j["n"]:
                nums += f"; {j['left'][0]:.2f} vs {j['right'][0]:.2f}"
            rows.append((name, j["verdict"], nums, j["folders"]))
            continue
        labels = _label([j["claim"].text for j in js])
        ns = {j["n"] for j in js}
        if ns == {0}:
            nums = diff_text(js[0]) + f" ({', '.join(labels)})"
        else:
            parts = [f"{lab} {j['diff'][0]:+.2f}" + (f" ± {j['diff'][1]:.2f}" if j["n"] > 1 else "")
                     + ("" if len(ns) == 1 else f" (n={j['n']})") for lab, j in zip(labels, js)]
            nums = "; ".join(parts) + (f" (n={ns.pop()})" if len(ns) == 1 else "")
        seeds = sorted({s for j in js for s in (j["seeds"] or j["present"])})
        runs = [r for j in js for r in j["runs"]]
        sides = [[r for j in js for r in j["sides"][k]] for k in (0, 1)]
        rows.append((name, _family_verdict([j["verdict"] for j in js]), nums, folders(brace(runs, sides), seeds)))
    return rows


def glance_block(suite_name: str, runs_dir: Path, data: dict | None = None) -> str:
    """README's "claims at a glance": the rule in one paragraph, then one row per claim (per family)."""
    suite = SUITES[suite_name]
    data = collect(runs_dir) if data is None else data
    judged = judge_claims(suite, data)
    lines = [f"Generated by `python -m benchmarks.report --suite {suite_name} --readme README.md` from the runs in "
             f"`{runs_dir.as_posix()}/` (one folder per run and seed). Rule: the per-seed difference left − right "
             "over the seeds both sides have; *held* when its mean exceeds its std over those seeds, *did not hold* "
             "when it is below minus the std, *within noise* otherwise, *one seed only* when one seed matches "
             "(not a claim). Last evaluation, or the checkpoint selected on a dev split where the claim says so; "
             f"per-claim rows: [claims.md](benchmarks/results/{suite_name}/claims.md).", "",
             "| claim | verdict | left − right: mean ± std over seeds | run folders |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in glance_rows(judged)]
    return "\n".join(lines)


START, END = "<!-- claims:start -->", "<!-- claims:end -->"


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the claims markers replaced by `block`; the rest byte-identical."""
    i, k = text.find(START), text.find(END)
    if i < 0 or k < i:
        raise ValueError(f"no {START} ... {END} block")
    return text[:i + len(START)] + "\n" + block.strip("\n") + "\n" + text[k:]


def update_readme(readme: Path, suite_name: str, runs_dir: Path) -> bool:
    """Rewrite README's claims block; True when the file changed."""
    old = readme.read_bytes().decode()  # bytes: line endings stay as they are
    new = replace_block(old, glance_block(suite_name, runs_dir))
    if new != old:
        readme.write_bytes(new.encode())
    return new != old


# ----------------------------------------------------------------------------- report
def build_report(suite_name: str, runs_dir: Path, out: Path, plots: bool = True) -> str:
    suite = SUITES[suite_name]
    reported = load_reported()
    data = collect(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [s["summary"] for v in data.values() for s in v]
    scripts = {r.script for r in suite.runs}
    oracle = sorted(s for s in scripts if s in BEST_SELECTED_ON and BEST_SELECTED_ON[s] is None)
    lines = [f"# Benchmark report: suite `{suite_name}`", "",
             f"{suite.description}. Generated {time.strftime('%Y-%m-%d', time.gmtime())} by "
             f"`python -m benchmarks.report --suite {suite_name}` at commit {git_commit()}, "
             f"from `{runs_dir.as_posix()}`.", "",
             commit_line(summaries), "",
             cpu_line(summaries), "",
             "Our numbers are mean ± std over seeds (sample std). *last* = the final evaluation (Co-teaching's "
             "protocol reports the mean of the last 10 epochs, also in each summary.json). *best* = the best "
             "evaluation of a run; the column says where it was chosen: "
             + (f"for {', '.join(oracle)} on the very split it reports (the test set; for scal.py GLUE dev or "
                "TREC test, as the paper does), so it is an oracle and no claim uses it; " if oracle else "")
             + "otherwise on a dev split the reported number never saw. "
             "Paper numbers come from `benchmarks/reported.csv`" + (" and are at the papers' scale, "
             "with other data, backbones and schedules: they are shown for orientation, never as a target."
             if suite_name != "paper" else "."), ""]
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in suite.runs:
        groups[r.group].append(r)
    by_id = {r.id: r for r in suite.runs}
    averages = {a.id: a for a in suite.averages}
    for group, runs in groups.items():
        lines += [f"## {group}", "", f"| run | metric | seeds | precision | {best_label(runs)} | last | paper | "
                  "paper source | diff (best - paper) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(run.id, v, row_stats(run, data.get(run.id, []), v),
                 len(run.only_seeds) if run.only_seeds is not None else len(suite.default_seeds))
                for run in runs for v in views_of(run)]
        rows += [(a.id, View("mean over runs", "", "", a.row, a.higher_is_better), average_stats(a, by_id, data),
                  len(suite.default_seeds)) for a in suite.averages if a.group == group]
        for rid, v, st, expected in rows:
            paper = reported.get(v.row) if v.row else None
            pv = f"{float(paper['value']):.2f}" if paper else "-"
            comparable = suite_name == "paper"  # other suites: other data and scale, no difference shown
            diff = f"{st['best'][0] - float(paper['value']):+.2f}" if paper and st["n"] and comparable else "-"
            src = f"{paper['source']} ({paper['dataset']}, {paper['backbone']})" if paper else "-"
            prec = precisions([x for r in (averages[rid].runs if rid in averages else (rid,)) for x in data.get(r, [])])
            lines.append(f"| {rid} | {v.name} | {st['n']} | {prec} | {fmt(st['best'])} | {fmt(st['last'])} | {pv} | "
                         f"{src} | "
                         f"{diff} | {status_of(suite_name, v, st, paper, expected)} |")
        if plots:
            png = plot_curves(group, runs, data, out)
            if png:
                lines += ["", f"![{group}]({png})"]
        lines.append("")
    if plots:  # CoNLST's Figure 3, from the confidence bins its runs record
        from benchmarks.confidence import report_figures

        lines += report_figures({r.id: data[r.id] for r in suite.runs if r.id in data}, out)
    if suite.claims:
        judged = judge_claims(suite, data)
        claims = ["## Claims checked", "", CLAIM_RULE, "", *claims_table(judged), ""]
        lines += claims
        (out / "claims.md").write_text("\n".join([f"# Claims: suite `{suite_name}`", "",
                                                   commit_line(summaries), "", cpu_line(summaries), "",
                                                   *claims[2:]]))
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=sorted(SUITES))
    ap.add_argument("--runs", default=None, help="folder holding <run>__seed<S>/ (default runs/bench/<suite>; "
                    "with --readme, the committed benchmarks/results/<suite>/runs)")
    ap.add_argument("--out", default=None,
                    help="where report.md, claims.md and the plots go (default benchmarks/results/<suite>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--readme", default=None, help="only rewrite this file's claims block (between "
                    f"{START} and {END}) from the runs, and write nothing else")
    args = ap.parse_args(argv)
    if args.readme:
        runs = Path(args.runs or Path("benchmarks") / "results" / args.suite / "runs")
        changed = update_readme(Path(args.readme), args.suite, runs)
        print(glance_block(args.suite, runs))
        print(f"\n{args.readme}: {'claims block rewritten' if changed else 'claims block already up to date'}")
        return 0
    runs = Path(args.runs or f"runs/bench/{args.suite}")
    out = Path(args.out or HERE / "results" / args.suite)
    print(build_report(args.suite, runs, out, plots=not args.no_plots))
    print(f"\nwritten: {out / 'report.md'}" + (f", {out / 'claims.md'}" if SUITES[args.suite].claims else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
