"""Does the regression check catch real bugs? (issue #27) Each mutation is one realistic one-line
bug (a flipped sign, a missing detach, a wrong temperature, an off-by-one, a dropped term) applied
to a copy of the working tree; the smoke rows it should break run on that copy, and
`benchmarks.check` compares them with benchmarks/baselines/smoke.json as CI would.

    python -m benchmarks.mutations --list                       # the mutations and their rows
    python -m benchmarks.mutations --only lacol_ --out benchmarks/results/mutations/lacol
    python -m benchmarks.mutations --combine m/lacol m/scal --out m     # merge matrices (m: the results folder)

A mutation names an exact fragment of the code (usually one line) of one file; it must occur exactly once in that
file, or the run stops with an error (the list must follow the code, never silently test
nothing). The matrix (mutation x row: caught or not) is written to <out>/matrix.md and
<out>/matrix.json. Slow (a smoke row per mutation and seed): not part of the test command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import check as chk
from benchmarks.suites import SUITES

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str  # an exact fragment, found exactly once in `file`
    new: str
    what: str  # the bug, in words
    rows: tuple[str, ...]  # the smoke run ids expected to catch it


L = ("lacol_check_sym40",)
S = ("scal_check_trec",)
U = ("uscal_check_minilm",)
C = ("conlst_check_en",)
M = ("msmo_check",)
MUTATIONS: list[Mutation] = [
    # ---- LaCoL
    Mutation("lacol_infonce_sign", "lacol.py", "pos = (z_anchor * z_pos).sum(1, keepdim=True) / tau",
             "pos = -(z_anchor * z_pos).sum(1, keepdim=True) / tau", "Eq. 2: the positive's similarity negated", L),
    Mutation("lacol_select_inverted", "lacol.py", "return probs_weak.argmax(dim=1) == given",
             "return probs_weak.argmax(dim=1) != given", "Eq. 3: selects the samples the model disagrees with", L),
    Mutation("lacol_sc_tau", "lacol.py", "return F.log_softmax(s / tau, dim=1)", "return F.log_softmax(s * tau, dim=1)",
             "Eq. 6: temperature multiplied instead of divided", L),
    Mutation("lacol_diversity_swapped", "lacol.py", "ls_logits = lw if args.wo_diversity else ls1",
             "ls_logits = ls1 if args.wo_diversity else lw", "L_LS trains on the weak view that selected (the "
             "w/o-diversity branch swapped)", L),
    Mutation("lacol_ms_dropped", "lacol.py", "loss = loss + args.lambda_ms * terms[\"l_ms\"]", "loss = loss",
             "L_MS computed and logged but left out of the total", L),
    Mutation("lacol_negatives_same_label", "lacol.py", "allowed = given[None, :] != given[:, None]",
             "allowed = given[None, :] == given[:, None]", "Eq. 1: negatives drawn from the anchor's own label", L),
    # ---- SCAL
    Mutation("scal_fgm_sign", "scal.py", "    return (epsilon * g / norm).to(grad.dtype)",
             "    return (-epsilon * g / norm).to(grad.dtype)", "Eq. 6: the perturbation points down the loss "
             "(training and the attacked evaluation)", S),
    Mutation("scal_fgm_batch_norm", "scal.py", "norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * "
             "(g.dim() - 1)))", "norm = g.norm().clamp_min(1e-12)", "Eq. 6: one L2 norm over the whole batch "
             "instead of one per example", S),
    Mutation("scal_ct_pos_tau", "scal.py", "pos = (z * z_pos).sum(-1) / tau", "pos = (z * z_pos).sum(-1) * tau",
             "Eq. 7: the positive's temperature multiplied", S),
    Mutation("scal_ct_positive_shifted", "scal.py", "pos = (z * z_pos).sum(-1) / tau",
             "pos = (z * z_pos.roll(1, 0)).sum(-1) / tau", "Eq. 7: each anchor paired with the next example's "
             "adversarial view (off by one)", S),
    Mutation("scal_ct_dropped", "scal.py", "return 0.5 * (ce + ce_adv) + alpha * l_ct", "return 0.5 * (ce + ce_adv)",
             "Eq. 8: the contrastive term left out of the total", S),
    Mutation("scal_adv_ce_dropped", "scal.py", "return 0.5 * (ce + ce_adv) + alpha * l_ct", "return ce + alpha * l_ct",
             "Eq. 8: the adversarial CE left out of the total", S),
    Mutation("scal_eval_attack_off", "scal.py", "x = x + adversarial_perturbation(task_loss_eq5(",
             "x = x + 0 * adversarial_perturbation(task_loss_eq5(", "the attacked evaluation no longer perturbs", S),
    # ---- USCAL
    Mutation("uscal_labels_shifted", "uscal.py", "F.cross_entropy(logits, torch.arange(len(a), device=a.device))",
             "F.cross_entropy(logits, torch.arange(len(a), device=a.device).roll(1))",
             "Eq. 4: each anchor's positive is the next sentence (off by one)", U),
    Mutation("uscal_tau_multiplied", "uscal.py", "logits = a @ o.t() / tau", "logits = a @ o.t() * tau",
             "Eq. 4: temperature multiplied instead of divided", U),
    Mutation("uscal_no_normalize", "uscal.py", "a, o = F.normalize(z_anchor.float(), dim=-1), "
             "F.normalize(z_other.float(), dim=-1)", "a, o = z_anchor.float(), z_other.float()",
             "Eq. 4: dot product instead of cosine", U),
    Mutation("uscal_adv_sign", "uscal.py", "    delta = perturb(grad, args.epsilon)",
             "    delta = -perturb(grad, args.epsilon)", "Eq. 9: the positive perturbed down the loss", U),
    Mutation("uscal_adv_dropped", "uscal.py", "return l_ct + alpha * l_adv", "return l_ct",
             "Eq. 10: the adversarial term left out of the total", U),
    Mutation("uscal_positive_is_anchor", "uscal.py", "z2 = model(model.embed(batch[\"input_ids\"]), batch)\n    "
             "l_ct = infonce_eq4(z1, z2, args.tau)\n    (grad,)", "z2 = z1\n    l_ct = infonce_eq4(z1, z2, "
             "args.tau)\n    (grad,)", "the dropout positive is the anchor pass itself (no second pass)", U),
    # ---- CoNLST
    Mutation("conlst_cl_pos_tau", "conlst.py", "pos = similarity_eq6(h_anchor.float(), h_pos.float(), distance) / tau",
             "pos = similarity_eq6(h_anchor.float(), h_pos.float(), distance) * tau",
             "Eq. 6: the positive's temperature multiplied (equivalent at the default tau = 1: kept as a "
             "reminder that a mutation can be a no-op)", C),
    Mutation("conlst_neg_mask_inverted", "conlst.py", "neg = neg.masked_fill(~neg_valid, float(\"-inf\"))",
             "neg = neg.masked_fill(neg_valid, float(\"-inf\"))", "Eq. 6: the valid negatives masked out and the "
             "padding slots kept", C),
    Mutation("conlst_negatives_own_class", "conlst.py", "allowed = comp_mask[:, pool_label]  # [B, P]",
             "allowed = ~comp_mask[:, pool_label]  # [B, P]", "Eq. 5: negatives drawn outside the complementary "
             "classes", C),
    Mutation("conlst_complementary_is_pred", "conlst.py", "others = F.one_hot((pred + shift) % c, c).bool()",
             "others = F.one_hot(pred, c).bool()", "Eq. 4: the complementary label is the predicted class", C),
    Mutation("conlst_nl_sign", "conlst.py", "return -(comp_mask.float() * log_one_minus_p).sum(dim=1).mean()",
             "return (comp_mask.float() * log_one_minus_p).sum(dim=1).mean()", "Eq. 1: negative learning's sign "
             "flipped (pushes p up on the complementary class)", C),
    Mutation("conlst_select_inverted", "conlst.py", "return max_probs >= thresholds[preds]",
             "return max_probs < thresholds[preds]", "Eq. 14: self-training keeps the unconfident samples", C),
    Mutation("conlst_mixup_labels_unmixed", "conlst.py", "return lx * x_i + (1 - lx) * x_j, ly * y_i + (1 - ly) * y_j",
             "return lx * x_i + (1 - lx) * x_j, y_i", "Eq. 10: inputs mixed, labels not", C),
    Mutation("conlst_clcs_dropped", "conlst.py", "loss = loss + args.lambda_clcs * terms[\"l_clcs\"]",
             "loss = loss", "Eq. 8: L_CLCS computed and logged but left out of stage 1's total", C),
    # ---- MSMO
    Mutation("msmo_critic_sign", "msmo.py", "critic_loss = -wasserstein_gap(", "critic_loss = wasserstein_gap(",
             "the critic minimises the Wasserstein estimate instead of maximising it", M),
    Mutation("msmo_no_clip", "msmo.py", "                    clip_weights_(critic, args.critic_clip)",
             "                    pass", "WGAN: the critic's weights never clipped", M),
    Mutation("msmo_gap_sign", "msmo.py", "masked_token_mean(q_src, mask_src) - masked_token_mean(q_tgt, mask_tgt)",
             "masked_token_mean(q_src, mask_src) + masked_token_mean(q_tgt, mask_tgt)",
             "W = mean Q(source) + mean Q(target): a sign error in the estimate", M),
    Mutation("msmo_kl_one_sided", "msmo.py", "return ((kl_pq + kl_qp) / 2).mean()", "return kl_pq.mean()",
             "the consistency KL one-sided instead of symmetric", M),
    Mutation("msmo_aspects_misaligned", "msmo.py", "q = torch.stack([span_distribution(probs[rb, pb], tag_index",
             "q = torch.stack([span_distribution(probs[ra, pb], tag_index", "the aligned aspect read on the wrong "
             "sentence's row", M),
    Mutation("msmo_adv_detached", "msmo.py", "                    q_s, q_t = critic(h_s), critic(h_t)",
             "                    q_s, q_t = critic(h_s.detach()), critic(h_t.detach())",
             "the encoder's adversarial term detached (no gradient reaches the encoder)", M),
    Mutation("msmo_beta_zero", "msmo.py", "parts[\"cons\"] = resolve_beta(args) * l_cons",
             "parts[\"cons\"] = 0.0 * l_cons", "the consistency term's weight lost (beta 0)", M),
]


def apply(m: Mutation, root: Path) -> None:
    """Write the mutation into root/m.file; raises ValueError unless m.old occurs exactly once."""
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"{m.id}: the fragment occurs {n} times in {m.file} (must be once): {m.old!r}")
    path.write_text(text.replace(m.old, m.new))


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files (no runs, no venv) into dst."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def caught_rows(baseline: dict, fresh: dict, rows: tuple[str, ...], crash_only: set[str],
                groups: dict[str, str]) -> dict[str, str]:
    """row -> the check's problem line for it ("" where the check passes that row)."""
    base = {**baseline, "runs": {r: baseline["runs"][r] for r in rows if r in baseline["runs"]}}
    problems = chk.check(base, fresh, baseline.get("floor", chk.FLOOR), baseline.get("k_std", chk.K_STD), groups,
                         crash_only, spread_from=baseline)
    return {r: next((p for p in problems if p.startswith(r + ":")), "") for r in rows}


def run_mutation(m: Mutation, seeds: list[int], work: Path, baseline: dict) -> dict:
    tree = work / m.id
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    copy_tree(tree)
    apply(m, tree)
    env = {**os.environ, "LIS_SHARED_DATA": os.environ.get("LIS_SHARED_DATA", str(ROOT.parent / "shared" / "data"))}
    out = tree / "runs"
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--only", *m.rows, "--seeds",
           *map(str, seeds), "--out-dir", str(out), "--workers", str(len(seeds)), "--threads", "1"]  # as CI
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    fresh = chk.fresh_values("smoke", out / "smoke")
    suite = SUITES["smoke"]
    crash_only = {r.id for r in suite.runs if not r.compare}
    caught = caught_rows(baseline, fresh, m.rows, crash_only, {r.id: r.group for r in suite.runs})
    crashed = [r for r in m.rows if r not in fresh]
    for r in crashed:  # a run that crashed is caught too: CI fails on a failed smoke run
        caught[r] = caught[r] or f"{r}: the run failed (exit {proc.returncode})"
    shutil.rmtree(tree, ignore_errors=True)
    return {**asdict(m), "caught": caught, "any_caught": any(caught.values()),
            "fresh": {r: {n: c["mean"] for n, c in fresh[r]["checks"].items()} for r in fresh}}


def matrix_md(results: list[dict]) -> str:
    lines = ["| mutation | bug | row | caught | check's line |", "|---|---|---|---|---|"]
    for res in results:
        for row, why in res["caught"].items():
            lines.append(f"| `{res['id']}` | {res['what']} | `{row}` | {'yes' if why else '**no**'} | {why or '-'} |")
    n = sum(r["any_caught"] for r in results)
    lines += ["", f"caught: {n} of {len(results)} mutations"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", nargs="*", help="mutations whose id starts with one of these strings (e.g. scal_)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="as the baseline's (default 0 1)")
    ap.add_argument("--out", default=None, help="write matrix.md and matrix.json here")
    ap.add_argument("--work", default=None, help="scratch folder for the mutated copies (default: a temp dir)")
    ap.add_argument("--combine", nargs="*", help="merge these folders' matrix.json (a later folder's result for a "
                    "mutation replaces an earlier one's) into --out, run nothing")
    args = ap.parse_args(argv)
    if args.combine:
        merged: dict[str, dict] = {}
        for folder in args.combine:
            merged |= {r["id"]: r for r in json.loads((Path(folder) / "matrix.json").read_text())}
        results = [merged[m.id] for m in MUTATIONS if m.id in merged]
        write_matrix(results, args.out)
        return 0
    todo = [m for m in MUTATIONS if not args.only or any(m.id.startswith(s) for s in args.only)]
    if args.list:
        for m in todo:
            print(f"{m.id:32s} {m.file:12s} {m.what}  -> {', '.join(m.rows)}")
        return 0
    for m in todo:  # every mutation must apply before anything runs
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"{m.id}: the fragment occurs {text.count(m.old)} times in {m.file} (must be once)")
    baseline = json.loads((ROOT / "benchmarks" / "baselines" / "smoke.json").read_text())
    work = Path(args.work or tempfile.mkdtemp(prefix="mutations-"))
    results = []
    for i, m in enumerate(todo, 1):
        res = run_mutation(m, args.seeds, work, baseline)
        print(f"[{i}/{len(todo)}] {m.id}: {'caught' if res['any_caught'] else 'NOT caught'}", flush=True)
        results.append(res)
    write_matrix(results, args.out)
    return 0


def write_matrix(results: list[dict], out: str | None) -> None:
    md = matrix_md(results)
    print(md)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "matrix.md").write_text(md)
        (Path(out) / "matrix.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
