"""Diagnostics of a sample selection on noisy labels (lacol.py logs them every LaCoL epoch).

Pure functions: tensors in, a dict of per-class lists out (JSON-ready, one entry per class).
"""

from __future__ import annotations

import torch


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    """num / den per class as floats; None where den is 0 (the ratio is undefined)."""
    return [n / d if d else None for n, d in zip(num.tolist(), den.tolist())]


def selection_per_class(selected: torch.Tensor, given: torch.Tensor, clean: torch.Tensor | None,
                        num_classes: int) -> dict[str, list]:
    """Per class k of the *given* label, for a boolean selection mask over the samples:

    - sel_count_per_class[k]     = #{i : selected_i, given_i = k}
    - sel_precision_per_class[k] = P(given label correct | selected, given class k)
                                 = #{selected_i, given_i = k, clean_i = k} / #{selected_i, given_i = k}
    - sel_recall_per_class[k]    = P(selected | given label correct, given class k)
                                 = #{selected_i, given_i = k, clean_i = k} / #{given_i = k, clean_i = k}

    A ratio whose denominator is 0 is None. Without the clean labels (`clean` None: Clothing1M)
    only the counts."""
    selected, given = selected.bool().cpu(), given.long().cpu()

    def count(mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount(given[mask], minlength=num_classes)

    out: dict[str, list] = {"sel_count_per_class": count(selected).tolist()}
    if clean is not None:
        right = given == clean.long().cpu()
        out["sel_precision_per_class"] = _ratio(count(selected & right), count(selected))
        out["sel_recall_per_class"] = _ratio(count(selected & right), count(right))
    return out


def selection_log(selected: torch.Tensor, given: torch.Tensor, clean: torch.Tensor | None, num_classes: int) -> dict:
    """The log of a selection mask over the training set (lacol.py's epoch selection): selected_frac,
    selected_precision = P(given label correct | selected) (0 when nothing is selected; absent without
    clean labels), both as fp32 means, and `selection_per_class`."""
    log = {"selected_frac": selected.float().mean().item()}
    if clean is not None:
        log["selected_precision"] = (given[selected] == clean[selected]).float().mean().item() if selected.any() else 0.
    return {**log, **selection_per_class(selected, given, clean, num_classes)}


def batch_selection_log(drawn: torch.Tensor, given: torch.Tensor, clean: torch.Tensor | None,
                        num_classes: int) -> dict:
    """The log of an epoch of batch-wise selections (lacol.py --selection batch). `drawn` [N] int8:
    -1 for a sample in no step of the epoch, else 1 when its batch selected it, 0 when not.
    selected_frac = selected / drawn, selected_precision = P(given label correct | selected) (0 when
    nothing is selected; absent without clean labels), and `selection_per_class` over the drawn samples."""
    seen, sel = drawn >= 0, drawn == 1
    n_sel = int(sel.sum())
    log: dict = {"selected_frac": n_sel / max(int(seen.sum()), 1)}
    if clean is not None:
        log["selected_precision"] = int((sel & (given == clean)).sum()) / n_sel if n_sel else 0.0
    return {**log, **selection_per_class(sel[seen], given[seen], None if clean is None else clean[seen], num_classes)}


CONFIDENCE_BINS = {"high": "max q > 0.9", "mid": "0.5 <= max q <= 0.9", "low": "max q < 0.5"}


def analysis_only_confidence_bins(probs: torch.Tensor, gold: torch.Tensor, n_hist: int = 20) -> dict:
    """ANALYSIS ONLY (conlst.py; Table 4, Figure 3; the report draws it): pseudo-label accuracy and counts
    per confidence bin, and histograms of the confidence of correctly (clean) and wrongly (noisy)
    pseudo-labeled samples. Reads target gold labels; its output never feeds training or model selection."""
    conf, pred = probs.max(dim=1)
    correct = pred == gold
    masks = {"high": conf > 0.9, "low": conf < 0.5}
    masks["mid"] = ~masks["high"] & ~masks["low"]
    out: dict = {}
    for name in ("high", "mid", "low"):
        m = masks[name]
        out[name] = {"n": int(m.sum()), "acc": 100.0 * correct[m].float().mean().item() if m.any() else None}
    out["all"] = {"n": int(len(gold)), "acc": 100.0 * correct.float().mean().item() if len(gold) else None}
    edges = torch.linspace(0, 1, n_hist + 1)
    b = torch.bucketize(conf.clamp(0, 1 - 1e-7), edges[1:-1], right=True)
    out["hist"] = {"edges": [round(x, 4) for x in edges.tolist()],
                   "clean": torch.bincount(b[correct], minlength=n_hist).tolist(),
                   "noisy": torch.bincount(b[~correct], minlength=n_hist).tolist()}
    return out


# ------------------------------------------------------------------------------------------
# Gradient norms of loss terms (scal.py --grad-ratio-every)
# ------------------------------------------------------------------------------------------
def loss_term_grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    """||d term / d params||_2 over all of `params` together (fp32), without touching their .grad and
    keeping the graph for the step's own backward pass; 0 for a term with no path to `params`."""
    if not term.requires_grad:
        return 0.0
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    squares = [(g.float() ** 2).sum() for g in grads if g is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def loss_term_grad_ratios(terms: dict[str, torch.Tensor], reference: str, params: list[torch.Tensor]) -> dict:
    """{term: ||grad term|| / ||grad terms[reference]||} for every term but the reference, the gradients
    taken on `params` (loss_term_grad_norm). Pass each term as it enters the total loss (times its weight)
    to see which one drives the update. None where the reference's gradient is 0."""
    ref = loss_term_grad_norm(terms[reference], params)
    return {k: (loss_term_grad_norm(v, params) / ref if ref > 0 else None) for k, v in terms.items() if k != reference}


def mean_grad_ratios(samples: list[dict], prefix: str = "gradratio_") -> dict[str, float]:
    """{prefix + term: mean over `samples`} of loss_term_grad_ratios records (their "step" key and None
    values left out); {} without samples."""
    keys = sorted({k for r in samples for k in r if k != "step"})
    vals = {k: [r[k] for r in samples if r.get(k) is not None] for k in keys}
    return {prefix + k: sum(v) / len(v) for k, v in vals.items() if v}


# ---- gradient shares of a loss's terms, and per-phase summaries (msmo.py --diag-every) ---------------
def grad_norm_ratios(terms: dict[str, torch.Tensor], params: list[torch.Tensor], ref: str) -> dict[str, float | None]:
    """gnorm_<ref> = ||grad terms[ref]|| and, per other term t, gratio_<t> = ||grad t|| / ||grad ref|| (None
    when the reference's norm is 0), on `params` (loss_term_grad_norm); without `ref` among the terms,
    gnorm_<t> of each."""
    norms = {k: loss_term_grad_norm(v, params) for k, v in terms.items()}
    if ref not in norms:
        return {f"gnorm_{k}": v for k, v in norms.items()}
    den = norms[ref]
    return {f"gnorm_{ref}": den, **{f"gratio_{k}": (v / den if den else None) for k, v in norms.items() if k != ref}}


def means_by_group(records: list[dict], key: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per value of records[i][key] (e.g. a training phase), per numeric field: its mean, first and last
    value and count over the records of that group (None values left out)."""
    out: dict[str, dict] = {}
    for rec in records:
        group = out.setdefault(str(rec[key]), {})
        for k, v in rec.items():
            if k != key and k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
                group.setdefault(k, []).append(float(v))
    return {g: {k: {"mean": sum(v) / len(v), "first": v[0], "last": v[-1], "n": len(v)} for k, v in fields.items()}
            for g, fields in out.items()}
