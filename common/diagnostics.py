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
