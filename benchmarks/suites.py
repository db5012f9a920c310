"""Suites of runs: each run is one script invocation, mapped to the reported number it
reproduces (an `id` of benchmarks/reported.csv) where there is one.

- `paper`: the papers' main tables and ablations at the papers' settings (GPUs, downloaded data).
- `cpu`:   the CPU-scale reproductions on offline real data (hours on 2 cores).
- `smoke`: every script and its major flags for a few steps (minutes), for CI's regression check.
- `speed`: method step time against its baseline's step time, measured in one process.

The runner adds `--seed S --out-dir <dir> --exp-name <run id>__seedS` to each command.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    id: str  # unique within a suite; the run directory is <id>__seed<S>
    script: str  # "lacol.py", ... or "-m benchmarks.speed"
    args: tuple[str, ...]
    group: str  # the table this run belongs to in the report
    row: str | None = None  # id in benchmarks/reported.csv
    metric: str = "acc"  # the summary.json metric compared with the paper / the baseline
    higher_is_better: bool = True
    only_seeds: tuple[int, ...] | None = None  # run with these seeds only (of those asked for)


@dataclass(frozen=True)
class Claim:
    """A comparison the report checks over the seeds: mean(left) > mean(right)."""

    text: str
    left: str  # run id
    right: str  # run id
    which: str = "final"  # "final" (last epoch) or "best"


@dataclass
class Suite:
    name: str
    runs: list[Run]
    default_seeds: tuple[int, ...]
    claims: list[Claim] = field(default_factory=list)
    description: str = ""


# ----------------------------------------------------------------------------- lacol: paper
def _lacol_paper() -> list[Run]:
    runs = []
    for ds, preset in (("cifar10", ()), ("cifar100", ("--preset", "cifar100"))):
        for noise in ("sym20", "sym40", "sym60", "asym20", "asym40"):
            for method in ("lacol", "ce"):
                runs.append(Run(f"lacol_{ds}_{noise}_{method}", "lacol.py", (*preset, "--noise", noise, "--method", method),
                                "LaCoL Table 1", f"lacol/{ds}/{noise}/{method}"))
        for noise in ("inst20", "inst40"):
            for method in ("lacol", "ce"):
                runs.append(Run(f"lacol_{ds}_{noise}_{method}", "lacol.py", (*preset, "--noise", noise, "--method", method),
                                "LaCoL Table 2", f"lacol/{ds}/{noise}/{method}"))
    for method in ("lacol", "ce"):
        runs.append(Run(f"lacol_clothing1m_{method}", "lacol.py", ("--preset", "clothing1m", "--method", method),
                        "LaCoL Table 3", f"lacol/clothing1m/real/{method}"))
    for noise in ("sym40", "asym40"):
        for abl in ("wo_diversity", "wo_ms", "wo_sc"):
            runs.append(Run(f"lacol_cifar100_{noise}_{abl}", "lacol.py",
                            ("--preset", "cifar100", "--noise", noise, "--" + abl.replace("_", "-")),
                            "LaCoL Table 4", f"lacol/cifar100/{noise}/{abl}"))
    return runs


# ----------------------------------------------------------------------------- lacol: cpu
# The CPU preset (lacol.py --preset cpu) was calibrated so that CE visibly suffers from the
# noise at this scale; see README "LaCoL: CPU-scale reproduction".
LACOL_CPU = ("--preset", "cpu")


def _lacol_cpu() -> list[Run]:
    runs = []
    for noise in ("sym40", "asym40"):
        for method in ("ce", "lacol"):
            runs.append(Run(f"lacol_fmnist_{noise}_{method}", "lacol.py", (*LACOL_CPU, "--noise", noise, "--method", method),
                            "LaCoL on Fashion-MNIST (CPU scale)", f"lacol/cifar10/{noise}/{method}"))
    runs.append(Run("lacol_fmnist_clean_ce", "lacol.py", (*LACOL_CPU, "--noise", "clean", "--method", "ce"),
                    "LaCoL on Fashion-MNIST (CPU scale)"))
    for abl in ("wo_diversity", "wo_ms", "wo_sc"):
        runs.append(Run(f"lacol_fmnist_sym40_{abl}", "lacol.py", (*LACOL_CPU, "--noise", "sym40", "--" + abl.replace("_", "-")),
                        "LaCoL ablation on Fashion-MNIST (CPU scale, seed 0)", f"lacol/cifar100/sym40/{abl}",
                        only_seeds=(0,)))
    return runs


LACOL_CPU_CLAIMS = [
    Claim("sym40: LaCoL's last-epoch accuracy is above CE's", "lacol_fmnist_sym40_lacol", "lacol_fmnist_sym40_ce"),
    Claim("asym40: LaCoL's last-epoch accuracy is above CE's", "lacol_fmnist_asym40_lacol", "lacol_fmnist_asym40_ce"),
    Claim("sym40: LaCoL's best-epoch accuracy is above CE's", "lacol_fmnist_sym40_lacol", "lacol_fmnist_sym40_ce", "best"),
    Claim("clean-label CE is above CE at sym40 (the noise hurts CE)", "lacol_fmnist_clean_ce", "lacol_fmnist_sym40_ce", "best"),
    Claim("full LaCoL above w/o L_MS (Table 4 ordering)", "lacol_fmnist_sym40_lacol", "lacol_fmnist_sym40_wo_ms"),
    Claim("full LaCoL above w/o L_SC (Table 4 ordering)", "lacol_fmnist_sym40_lacol", "lacol_fmnist_sym40_wo_sc"),
    Claim("full LaCoL above w/o diversity (Table 4 ordering)", "lacol_fmnist_sym40_lacol", "lacol_fmnist_sym40_wo_diversity"),
    Claim("w/o diversity above w/o L_MS (Table 4 ordering)", "lacol_fmnist_sym40_wo_diversity", "lacol_fmnist_sym40_wo_ms"),
]

# ----------------------------------------------------------------------------- lacol: smoke
LACOL_SMOKE = ("--preset", "demo", "--limit-train", "2048", "--limit-eval", "1000", "--epochs", "3",
               "--warmup-epochs", "2", "--batch-size", "64", "--num-workers", "0", "--deterministic")


def _lacol_smoke() -> list[Run]:
    runs = [Run("lacol_smoke_ce", "lacol.py", (*LACOL_SMOKE, "--method", "ce"), "lacol smoke"),
            Run("lacol_smoke_lacol", "lacol.py", LACOL_SMOKE, "lacol smoke"),
            Run("lacol_smoke_asym", "lacol.py", (*LACOL_SMOKE, "--noise", "asym40"), "lacol smoke")]
    for flag in ("--wo-ms", "--wo-sc", "--wo-diversity", "--selection=batch", "--class-weight=proportional",
                 "--label-sim=dot", "--sc-stopgrad"):
        name = flag.strip("-").replace("=", "_").replace("-", "_")
        runs.append(Run(f"lacol_smoke_{name}", "lacol.py", (*LACOL_SMOKE, flag), "lacol smoke", only_seeds=(0,)))
    return runs


SUITES: dict[str, Suite] = {
    "paper": Suite("paper", _lacol_paper(), (0, 1, 2, 3, 4),
                   description="the papers' tables at the papers' settings (GPU, downloaded data)"),
    "cpu": Suite("cpu", _lacol_cpu(), (0, 1, 2), LACOL_CPU_CLAIMS,
                 description="CPU-scale reproductions on offline real data"),
    "smoke": Suite("smoke", _lacol_smoke(), (0, 1), description="every script and major flag for a few steps"),
    "speed": Suite("speed", [Run("speed_lacol", "-m benchmarks.speed", ("--method", "lacol"), "speed", metric="ratio",
                                 higher_is_better=False)], (0,),
                   description="method step time / baseline step time in one process"),
}
