"""Speed of each method against its baseline, measured in one process on the same batch.

    python -m benchmarks.speed --method lacol                 # small CNN, Fashion-MNIST batch
    python -m benchmarks.speed --method lacol --backbone resnet34   # paper backbone, CIFAR shape

Step times are the median over interleaved repetitions (method, baseline, method, ...), so
a load change on a shared machine hits both. Also: samples per second of the model step and
of the data pipeline (DataLoader workers producing the views, no model), and the memory
ratio: on CUDA the peak allocated memory, on CPU the bytes of activations saved for the
backward pass (a deterministic count). Writes summary.json like a script run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from common import utils


def saved_activation_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward while fn() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def time_steps(steps: dict, reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Interleave the step functions; return per-function lists of seconds."""
    for _ in range(warmup):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return times


def measure_lacol(args) -> dict:
    import lacol
    from common import data as image_data
    from common.models import build_backbone

    device = utils.resolve_device(args.device)
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    utils.seed_everything(0)
    if args.backbone == "small_cnn":
        d = image_data.load_fashion_mnist()
        dataset = "fashion_mnist"
    else:
        d = image_data.fake_cifar10(n_train=max(4 * args.batch_size, 512))
        dataset = "fake_cifar10"
    la = lacol.Args(dataset=dataset, backbone=args.backbone, batch_size=args.batch_size, num_workers=args.num_workers)
    weak, strong, _ = lacol.make_views(dataset, d.train_x.shape[-1], la.randaug_ops, la.randaug_magnitude)
    n = min(len(d.train_y), 20 * args.batch_size)
    ds = lacol.NoisyImages(d.train_x[:n], d.train_y[:n], (weak, strong), n_views=3)
    # data pipeline alone
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    t, seen = time.perf_counter(), 0
    for i, (*views, y, idx) in enumerate(loader):
        seen += len(y)
        if i + 1 >= args.loader_batches:
            break
    loader_sps = seen / (time.perf_counter() - t)
    # one batch, both steps, same model
    *views, y, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True)))
    in_ch = 1 if dataset == "fashion_mnist" else 3
    model = lacol.LaCoLNet(build_backbone(args.backbone, in_ch, image_data.MEAN_STD[dataset]), 10, la.proj_dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x3 = torch.cat(views).to(device)
    x1 = views[0].to(device)
    y = y.to(device)

    def step_ce():
        loss, _ = lacol.ce_step(model, x1, y, device, amp_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_lacol():
        loss, _, _ = lacol.lacol_step(model, x3, y, la, device, amp_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = time_steps({"lacol": step_lacol, "ce": step_ce}, args.reps)
    t_l, t_c = statistics.median(times["lacol"]), statistics.median(times["ce"])
    if device.type == "cuda":
        mem = {}
        for k, f in (("lacol", step_lacol), ("ce", step_ce)):
            torch.cuda.reset_peak_memory_stats()
            f()
            mem[k] = torch.cuda.max_memory_allocated()
        mem_kind = "cuda peak allocated bytes"
    else:
        mem = {k: saved_activation_bytes(lambda f=f: f()) for k, f in (("lacol", step_lacol), ("ce", step_ce))}
        mem_kind = "activation bytes saved for backward"
    return {
        "method_step_s": t_l, "baseline_step_s": t_c, "ratio": t_l / t_c,
        "method_samples_per_s": args.batch_size / t_l, "baseline_samples_per_s": args.batch_size / t_c,
        "loader_samples_per_s": loader_sps, "loader_over_model": loader_sps / (args.batch_size / t_l),
        "memory_method": mem["lacol"], "memory_baseline": mem["ce"], "memory_ratio": mem["lacol"] / mem["ce"],
        "memory_kind": mem_kind, "batch_size": args.batch_size, "backbone": args.backbone, "reps": args.reps,
        "loader_workers": args.num_workers, "baseline": "ce (one weak view)", "method": "lacol (three views, Eq. 8)",
        "target_ratio": 3.3,
    }


MEASURES = {"lacol": measure_lacol}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=sorted(MEASURES))
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--loader-batches", type=int, default=15)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/speed")
    ap.add_argument("--exp-name", default="")
    args = ap.parse_args(argv)
    with utils.cli_errors():
        t = time.time()
        res = MEASURES[args.method](args)
        run_dir = utils.make_run_dir(args.out_dir, args.exp_name or f"speed_{args.method}__seed{args.seed}")
        utils.atomic_write_json(run_dir / "args.json", vars(args))
        summary = {"script": "benchmarks/speed.py", "method": args.method, "dataset": "-", "setting": args.backbone,
                   "seed": args.seed, "primary_metric": "ratio", "final": {k: v for k, v in res.items()},
                   "best": {k: v for k, v in res.items()}, "wall_s": round(time.time() - t, 2)}
        utils.write_summary(run_dir, summary)
        for k, v in res.items():
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
