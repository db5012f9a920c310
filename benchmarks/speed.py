"""Speed of each method against its baseline, measured in one process on the same batch.

    python -m benchmarks.speed --method lacol                 # small CNN, Fashion-MNIST batch
    python -m benchmarks.speed --method lacol --backbone resnet34   # paper backbone, CIFAR shape
    python -m benchmarks.speed --method scal      # scal_step / ft_step, MiniLM-L6, batch 32 (also uscal,
                                                  # conlst: stage 2 / FixMatch and stage 1 / fine-tuning,
                                                  # msmo: MSMO step with critic updates / ACS step)

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


def _train_step(model_params, step_fn, device, amp_dtype):
    """A full training step around `step_fn() -> (loss, terms)`: forward, backward, Adam (lr 0,
    so the weights, and hence every later step, stay the same)."""
    opt = torch.optim.Adam([p for p in model_params if p.requires_grad], lr=0.0)

    def run():
        with utils.autocast(device, amp_dtype):
            loss, _ = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def _ratio_result(times: dict, method: str, baseline: str, batch: int, target: float, what: dict) -> dict:
    t_m, t_b = statistics.median(times[method]), statistics.median(times[baseline])
    return {"method_step_s": t_m, "baseline_step_s": t_b, "ratio": t_m / t_b, "target_ratio": target,
            "method_samples_per_s": batch / t_m, "baseline_samples_per_s": batch / t_b, "batch_size": batch, **what}


def _text_args(cls, presets, argv):
    return utils.parse_args(cls, argv, presets=presets)


def measure_scal(args) -> dict:
    """scal_step vs ft_step on one batch of --batch-size examples of the CPU protocol (MiniLM-L6)."""
    import scal
    from common.text_data import load_text_task

    a = _text_args(scal.Args, scal.PRESETS, ["--preset", args.text_preset or "cpu", "--task", args.task or "sst2"])
    device = utils.resolve_device(args.device)
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    utils.seed_everything(0)
    train = load_text_task(a.task, "train", utils.shared_data_dir())
    examples = train[: args.batch_size]
    encoder, tok = scal.load_model(a, [e.text_a for e in examples])
    model = scal.SCALModel(encoder, max(e.label for e in train) + 1).to(device).train()
    batch = scal.collate(scal.encode_examples(tok, examples, a.max_length), tok.pad_token_id, device, False)
    steps = {name: _train_step(model.parameters(), lambda f=f: f(model, batch, a), device, amp_dtype)
             for name, f in (("scal", scal.scal_step), ("ft", scal.ft_step))}

    # The parts a SCAL step is made of, timed in the same interleaved loop, to tell the cost of
    # the method from the cost of its implementation. A step needs two forward passes, one
    # backward pass to the input embeddings only (the attack direction, no weight gradients)
    # and the backward pass of both graphs, then one optimizer step; so the least any
    # implementation can take is floor = 2 * fwd + (fwd_grad_embeds - fwd) + 2 * (fwd_bwd - fwd)
    # + (ft - fwd_bwd), and floor / ft is the lowest ratio this loss allows on this machine.
    def clean_loss():  # embeddings and the CE of the clean input, with the graph
        with utils.autocast(device, amp_dtype):
            x = model.embed(batch["input_ids"])
            logits, _ = model(x, batch, with_z=False)
            return x, scal.task_loss_eq5(logits, batch["labels"])

    def fwd():
        clean_loss()

    def fwd_grad_embeds():
        x, loss = clean_loss()
        torch.autograd.grad(loss, x)

    def fwd_bwd():
        _, loss = clean_loss()
        model.zero_grad(set_to_none=True)
        loss.backward()

    times = time_steps({**steps, "fwd": fwd, "fwd_grad_embeds": fwd_grad_embeds, "fwd_bwd": fwd_bwd}, args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = (2 * med["fwd"] + (med["fwd_grad_embeds"] - med["fwd"]) + 2 * (med["fwd_bwd"] - med["fwd"])
             + (med["ft"] - med["fwd_bwd"]))
    return _ratio_result(times, "scal", "ft", len(examples), 2.3,
                         {"model": a.model, "task": a.task, "baseline": "ft_step", "method": "scal_step (Eq. 8)",
                          "floor_ratio": floor / med["ft"], "fwd_s": med["fwd"],
                          "fwd_grad_embeds_s": med["fwd_grad_embeds"], "fwd_bwd_s": med["fwd_bwd"]})


def measure_uscal(args) -> dict:
    """uscal_step vs simcse_step on one batch of --batch-size training sentences (MiniLM-L6)."""
    import uscal

    a = _text_args(uscal.Args, uscal.PRESETS, ["--preset", args.text_preset or "cpu"])
    device = utils.resolve_device(args.device)
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    utils.seed_everything(0)
    sentences = uscal.load_training_sentences(a, utils.shared_data_dir())[: args.batch_size]
    encoder, tok = uscal.load_model(a, sentences)
    model = uscal.SimCSEModel(encoder).to(device).train()
    batch = uscal.tokenize_batch(tok, sentences, a.max_length, device)
    steps = {name: _train_step(model.parameters(), lambda f=f: f(model, batch, a), device, amp_dtype)
             for name, f in (("uscal", uscal.uscal_step), ("simcse", uscal.simcse_step))}
    times = time_steps(steps, args.reps)
    return _ratio_result(times, "uscal", "simcse", len(sentences), 1.8,
                         {"model": a.model, "baseline": "simcse_step", "method": "uscal_step (Eq. 10)"})


def measure_conlst(args) -> dict:
    """Stage 2 (st_step) vs plain FixMatch and stage 1 (conl_step) vs plain fine-tuning, each
    pair on the same batch (conlst.speed_steps), e5-small as in the CPU preset."""
    import conlst

    a = _text_args(conlst.Args, conlst.PRESETS, ["--preset", args.text_preset or "cpu", "--langs", "fr"])
    utils.seed_everything(0)
    steps = conlst.speed_steps(a)
    times = time_steps(steps, args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    b2, b1 = a.s2_batch_size + a.s2_source_batch_size, a.s1_batch_size
    return {"method_step_s": med["st"], "baseline_step_s": med["fixmatch"], "ratio": med["st"] / med["fixmatch"],
            "target_ratio": 1.3, "stage1_step_s": med["conl"], "ft_step_s": med["ft"],
            "stage1_over_ft": med["conl"] / med["ft"], "method_samples_per_s": b2 / med["st"],
            "baseline_samples_per_s": b2 / med["fixmatch"], "stage1_samples_per_s": b1 / med["conl"],
            "ft_samples_per_s": b1 / med["ft"], "model": a.model,
            "baseline": "fixmatch_step (stage 2's baseline) and ft_step (stage 1's)",
            "method": "st_step (stage 2, Eq. 9-14) and conl_step (stage 1, Eq. 4-8)"}


def measure_msmo(args) -> dict:
    """MSMO steps (adversarial phase with its critic updates; consistency phase) vs the ACS step
    (tagging CE), same CE batch, e5-small as in the CPU preset. Also counts encoder forward
    passes per step: the critic updates must reuse the step's features, not re-run the encoder."""
    import msmo

    a = _text_args(msmo.Args, msmo.PRESETS, ["--preset", args.text_preset or "cpu", "--lang", "fr"])
    device = utils.resolve_device(args.device)
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    utils.seed_everything(0)
    data = msmo.load_data(a)
    encoder, tok = msmo.build_encoder(a.model, a.data_dir, a.domain)
    model = msmo.Tagger(encoder, len(msmo.tag_list(a.tagging)))
    if a.freeze_embeddings:
        msmo.freeze_word_embeddings(model)
    model.to(device).train()
    enc = msmo.encode_data(a, data, tok)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(enc["ce_pool"]), generator=g)[: a.batch_size].tolist()
    items, sides = [enc["ce_pool"][i] for i in idx], [enc["ce_sides"][i] for i in idx]
    if not (0 in sides and 1 in sides):  # the adversarial term needs both languages in the batch
        src = next(i for i, s in enumerate(enc["ce_sides"]) if s == 0)
        tgt = next(i for i, s in enumerate(enc["ce_sides"]) if s == 1)
        items[:2], sides[:2] = [enc["ce_pool"][src], enc["ce_pool"][tgt]], [0, 1]
    pairs = enc["pairs"][: a.cons_batch]
    batch = msmo.make_batch(items, tok.pad_token_id, device, sides)
    batch_pairs = msmo.make_batch(items, tok.pad_token_id, device, sides, pairs)
    critic = msmo.Critic(encoder.config.hidden_size, encoder.config.hidden_dropout_prob, a.critic_clip).to(device)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=a.critic_lr or a.lr)
    calls = {"n": 0}
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    steps = {
        "msmo_adv": _train_step(model.parameters(), lambda: msmo.msmo_step(
            model, critic, critic_opt, batch, a, "adv", a.critic_steps, amp_dtype), device, amp_dtype),
        "msmo_cons": _train_step(model.parameters(), lambda: msmo.msmo_step(
            model, critic, critic_opt, batch_pairs, a, "cons", a.critic_steps, amp_dtype), device, amp_dtype),
        "acs": _train_step(model.parameters(), lambda: msmo.ce_step(model, batch, a, amp_dtype), device, amp_dtype),
    }
    forwards = {}
    for k, f in steps.items():
        calls["n"] = 0
        f()
        forwards[k] = calls["n"]
    times = time_steps(steps, args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"method_step_s": med["msmo_adv"], "baseline_step_s": med["acs"], "ratio": med["msmo_adv"] / med["acs"],
            "cons_step_s": med["msmo_cons"], "cons_over_acs": med["msmo_cons"] / med["acs"],
            "critic_steps": a.critic_steps, "encoder_forwards_adv_step": forwards["msmo_adv"],
            "encoder_forwards_cons_step": forwards["msmo_cons"], "encoder_forwards_acs_step": forwards["acs"],
            "method_samples_per_s": len(items) / med["msmo_adv"], "baseline_samples_per_s": len(items) / med["acs"],
            "batch_size": len(items), "cons_pairs": len(pairs), "model": a.model,
            "baseline": "ce_step (ACS)", "method": f"msmo_step, adversarial phase with {a.critic_steps} critic updates"}


MEASURES = {"lacol": measure_lacol, "scal": measure_scal, "uscal": measure_uscal, "conlst": measure_conlst,
            "msmo": measure_msmo}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=sorted(MEASURES))
    ap.add_argument("--backbone", default="small_cnn", help="lacol: backbone")
    ap.add_argument("--text-preset", default=None, help="text methods: the script's preset (default: cpu)")
    ap.add_argument("--task", default=None, help="scal: task (default: sst2)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="lacol 128, scal 32, uscal 64 (the papers' batches); conlst and msmo use their presets'")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--loader-batches", type=int, default=15)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/speed")
    ap.add_argument("--exp-name", default="")
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = {"lacol": 128, "scal": 32, "uscal": 64}.get(args.method, 0)
    with utils.cli_errors():
        t = time.time()
        res = MEASURES[args.method](args)
        run_dir = utils.make_run_dir(args.out_dir, args.exp_name or f"speed_{args.method}__seed{args.seed}")
        utils.atomic_write_json(run_dir / "args.json", vars(args))
        summary = {"script": "benchmarks/speed.py", "method": args.method, "dataset": "-", "setting": res.get("model", args.backbone),
                   "seed": args.seed, "primary_metric": "ratio", "final": {k: v for k, v in res.items()},
                   "best": {k: v for k, v in res.items()}, "wall_s": round(time.time() - t, 2)}
        utils.write_summary(run_dir, summary)
        for k, v in res.items():
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
