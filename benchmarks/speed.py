"""Speed of each method against its baseline, measured in one process on the same batch.

    python -m benchmarks.speed --method lacol                 # small CNN, Fashion-MNIST batch
    python -m benchmarks.speed --method lacol --backbone resnet34   # paper backbone, CIFAR shape
    python -m benchmarks.speed --method scal      # scal_step / ft_step, MiniLM-L6, batch 32 (also uscal,
                                                  # conlst: stage 2 / FixMatch and stage 1 / fine-tuning,
                                                  # msmo: MSMO step with critic updates / ACS step)

Step times are the median over interleaved repetitions (method, baseline, method, ...), so
a load change on a shared machine hits both. Every step is timed in fp32 and in bf16 autocast
and, for the text methods, on a random batch (what the `cpu` presets trained on before length
grouping) and on a length-grouped batch (what they train on now), all in the same interleaved
loop on the same model; each batch is the one of mean padded size among an epoch's batches.
`ratio` and the other headline figures are for the configuration the scripts use by default
here (`--precision`, default auto, and length-grouped batches); `speedup_*` is fp32 on random
batches over that configuration. Also: samples per second of the model step and
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

CONFIGS_TEXT = (("fp32", "random"), ("fp32", "grouped"), ("bf16", "random"), ("bf16", "grouped"))
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def typical_batch(lengths: list[int], batch_size: int, grouped: bool, seed: int = 0) -> list[int]:
    """Indices of a typical training batch: of one epoch's batches, in random order or
    length-grouped (common.text_data.length_grouped_order), the one whose padded size (its
    longest item) is closest to the mean over the epoch's batches; a step's time grows about
    linearly with the padded size, so this batch's step time stands for the epoch's mean step
    time. Cycles through the items when there are fewer than `batch_size`."""
    from common.text_data import length_grouped_order

    g = torch.Generator().manual_seed(seed)
    order = (length_grouped_order(lengths, batch_size, g) if grouped
             else torch.randperm(len(lengths), generator=g).tolist())
    if len(order) < batch_size:
        return [order[i % len(order)] for i in range(batch_size)]
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    padded = [max(lengths[i] for i in b) for b in batches]
    mean = sum(padded) / len(padded)
    return batches[min(range(len(batches)), key=lambda k: abs(padded[k] - mean))]


def default_config(args, device) -> tuple[str, str]:
    """The (precision, batches) the scripts use by default on this machine."""
    amp_dtype, _ = utils.resolve_precision(args.precision, device)
    return ("fp32" if amp_dtype is None else "bf16"), "grouped"


def grid_result(times: dict, m: str, b: str, batch: int, target: float, default: tuple,
                configs=CONFIGS_TEXT, **what) -> dict:
    """Headline figures for the default configuration plus, per configuration `prec_order`, the
    two step times, their ratio and the speed-up of each step over fp32 on random batches."""
    med = {k: statistics.median(v) for k, v in times.items()}
    key = "/".join(default)
    first = "/".join(configs[0])
    out = {"method_step_s": med[f"{m}/{key}"], "baseline_step_s": med[f"{b}/{key}"],
           "ratio": med[f"{m}/{key}"] / med[f"{b}/{key}"], "target_ratio": target,
           "method_samples_per_s": batch / med[f"{m}/{key}"],
           "baseline_samples_per_s": batch / med[f"{b}/{key}"], "batch_size": batch,
           "config": key, "speedup_method": med[f"{m}/{first}"] / med[f"{m}/{key}"],
           "speedup_baseline": med[f"{b}/{first}"] / med[f"{b}/{key}"], **what}
    for c in configs:
        c = "/".join(c)
        name = c.replace("/", "_")
        out |= {f"{name}_method_step_s": med[f"{m}/{c}"], f"{name}_baseline_step_s": med[f"{b}/{c}"],
                f"{name}_ratio": med[f"{m}/{c}"] / med[f"{b}/{c}"]}
    return out


def measure_lacol(args) -> dict:
    import lacol
    from common import data as image_data
    from common.models import build_backbone

    device = utils.resolve_device(args.device)
    utils.seed_everything(0)
    if args.backbone in ("small_cnn", "cnn_fc"):  # the 28x28 backbones
        d = image_data.load_fashion_mnist()
        dataset = "fashion_mnist"
    else:
        d = image_data.fake_cifar10(n_train=max(4 * args.batch_size, 512))
        dataset = "fake_cifar10"
    la = lacol.Args(dataset=dataset, backbone=args.backbone, batch_size=args.batch_size, num_workers=args.num_workers)
    weak, strong, _ = lacol.make_views(dataset, d.train_x.shape[-1], la.randaug_ops, la.randaug_magnitude)
    n = min(len(d.train_y), 20 * args.batch_size)
    ds = image_data.NoisyImages(d.train_x[:n], d.train_y[:n], (weak, strong), n_views=3)
    # data pipeline alone
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    t, seen = time.perf_counter(), 0
    for i, (*views, y, idx) in enumerate(loader):
        seen += len(y)
        if i + 1 >= args.loader_batches:
            break
    loader_sps = seen / (time.perf_counter() - t)
    # one batch, both steps; one model per precision (same initial weights), in the memory layout
    # lacol.py uses for it (channels-last under autocast)
    *views, y, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True)))
    in_ch = 1 if dataset == "fashion_mnist" else 3
    y = y.to(device)

    def make_steps(dt):
        torch.manual_seed(0)
        model = lacol.LaCoLNet(build_backbone(args.backbone, in_ch, image_data.MEAN_STD[dataset]), 10,
                               la.proj_dim).to(device)
        fmt = torch.channels_last if lacol.channels_last(device, dt) else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x3 = torch.cat(views).to(device).contiguous(memory_format=fmt)
        x1 = views[0].to(device).contiguous(memory_format=fmt)

        def step_ce():
            loss, _ = lacol.ce_step(model, x1, y, device, dt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def step_lacol():
            loss, _, _ = lacol.lacol_step(model, x3, y, la, device, dt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step_lacol, step_ce

    steps = {}
    for prec, dt in DTYPES.items():
        steps[f"lacol/{prec}"], steps[f"ce/{prec}"] = make_steps(dt)
    prec = default_config(args, device)[0]
    step_lacol, step_ce = steps[f"lacol/{prec}"], steps[f"ce/{prec}"]
    times = time_steps(steps, args.reps)
    res = grid_result(times, "lacol", "ce", args.batch_size, 3.3, (prec,), configs=(("fp32",), ("bf16",)))
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
        **res, "loader_samples_per_s": loader_sps, "loader_over_model": loader_sps / res["method_samples_per_s"],
        "memory_method": mem["lacol"], "memory_baseline": mem["ce"], "memory_ratio": mem["lacol"] / mem["ce"],
        "memory_kind": mem_kind, "backbone": args.backbone, "reps": args.reps,
        "loader_workers": args.num_workers, "baseline": "ce (one weak view)", "method": "lacol (three views, Eq. 8)",
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
    train = load_text_task(a.task, "train", utils.resolve_text_data_dir(a.data_dir))
    encoder, tok = scal.load_model(a, [e.text_a for e in train[: args.batch_size]])
    model = scal.SCALModel(encoder, max(e.label for e in train) + 1).to(device).train()
    encoded = scal.encode_examples(tok, train, a.max_length)
    lengths = [len(e["input_ids"]) for e in encoded]
    batches = {order: scal.collate([encoded[i] for i in typical_batch(lengths, args.batch_size, order == "grouped")],
                                   tok, device, False) for order in ("random", "grouped")}
    steps = {f"{name}/{prec}/{order}": _train_step(model.parameters(), lambda f=f, b=batches[order]: f(model, b, a),
                                                   device, DTYPES[prec])
             for prec, order in CONFIGS_TEXT for name, f in (("scal", scal.scal_step), ("ft", scal.ft_step))}
    default = default_config(args, device)
    batch = batches[default[1]]

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
             + (med["ft/" + "/".join(default)] - med["fwd_bwd"]))
    ft = med["ft/" + "/".join(default)]
    return grid_result(times, "scal", "ft", args.batch_size, 2.3, default, model=a.model, task=a.task,
                       baseline="ft_step", method="scal_step (Eq. 8)", floor_ratio=floor / ft, fwd_s=med["fwd"],
                       fwd_grad_embeds_s=med["fwd_grad_embeds"], fwd_bwd_s=med["fwd_bwd"])


def measure_uscal(args) -> dict:
    """uscal_step vs simcse_step on one batch of --batch-size training sentences (MiniLM-L6)."""
    import uscal
    from common.text_data import load_unlabelled_sentences
    from common.text_models import tokenize_batch

    a = _text_args(uscal.Args, uscal.PRESETS, ["--preset", args.text_preset or "cpu"])
    device = utils.resolve_device(args.device)
    utils.seed_everything(0)
    sentences, _ = load_unlabelled_sentences(a.train_data, utils.resolve_text_data_dir(a.data_dir), a.source,
                                             a.limit_train, a.subset_seed)
    encoder, tok = uscal.load_model(a, sentences)
    model = uscal.SimCSEModel(encoder).to(device).train()
    lengths = [len(x) for x in sentences]  # characters, as uscal.epoch_order groups them
    batches = {order: tokenize_batch(tok, [sentences[i] for i in typical_batch(lengths, args.batch_size,
                                                                                 order == "grouped")],
                                     a.max_length, device) for order in ("random", "grouped")}
    steps = {f"{name}/{prec}/{order}": _train_step(model.parameters(), lambda f=f, b=batches[order]: f(model, b, a),
                                                   device, DTYPES[prec])
             for prec, order in CONFIGS_TEXT
             for name, f in (("uscal", uscal.uscal_step), ("simcse", uscal.simcse_step))}
    times = time_steps(steps, args.reps)
    return grid_result(times, "uscal", "simcse", args.batch_size, 1.8, default_config(args, device), model=a.model,
                       baseline="simcse_step", method="uscal_step (Eq. 10)")


# ---- CoNLST's steps and their baselines on the same batches (used only here and in tests/test_speed.py)
def fixmatch_batch(net, a, pairs: list[tuple[str, str]], source: list) -> dict:
    """The plain-FixMatch baseline's batch: weak (original) and strong (masked) views, a source batch."""
    import conlst
    from common.text_data import tokenize_pairs

    enc = tokenize_pairs(net.tok, pairs, net.prefix, net.max_length, maskable=True)
    strong = dict(enc, input_ids=conlst.random_token_masking(enc["input_ids"], enc["maskable"], a.mask_ratio,
                                                             net.tok.mask_token_id))
    enc.pop("maskable")
    strong.pop("maskable")
    return {"weak": conlst.to_device(enc, net.device), "strong": conlst.to_device(strong, net.device),
            **conlst.make_ft_batch(net, source)}


def fixmatch_step(model, batch: dict, a, threshold: float = 0.95) -> tuple[torch.Tensor, dict]:
    """Plain FixMatch (the speed baseline of CoNLST's stage 2): pseudo-labels from the weak view in
    the same step (no gradient), CE on the strong view where the confidence reaches a fixed threshold."""
    import torch.nn.functional as F

    with torch.no_grad():
        conf, pl = model(batch["weak"]).float().softmax(1).max(1)
    l_u = (F.cross_entropy(model(batch["strong"]).float(), pl, reduction="none") * (conf >= threshold)).mean()
    l_sup = F.cross_entropy(model(batch["src"]).float(), batch["src_labels"])
    return l_sup + a.lambda_u * l_u, {"l_sup": l_sup.detach(), "l_u": l_u.detach()}


def conlst_steps(a, lang: str | None = None, pick=None) -> dict:
    """Zero-argument callables, each one full training step (forward, loss, backward, optimizer
    step with lr 0) on a fixed batch: 'ft' (plain fine-tuning, conlst.ft_step) and 'conl' (stage 1,
    conlst.conl_step) share their source pairs; 'fixmatch' (plain FixMatch, fixmatch_step) and 'st'
    (stage 2, conlst.st_step) share their target and source pairs. The model is `a`'s encoder (a
    conlst.Args) with fresh heads; in the stage-1 batch every anchor has K valid negatives (the costliest
    case). `pick(items, n)` chooses the rows of each batch (default: the first n, cycling). Writes nothing."""
    import conlst
    from common.text_data import load_xnli_transfer

    conlst.validate(a)
    device = utils.resolve_device(a.device)
    amp_dtype, _ = utils.resolve_precision(a.precision, device)
    utils.seed_everything(a.seed)
    lang = lang or conlst.resolve_langs(a)[0]
    data = load_xnli_transfer(a, [lang])
    model, tok, prefix = conlst.build_model(a, [s for e in data.source for s in (e.text_a, e.text_b)]
                                            + [s for p in data.targets[lang].pool for s in p])
    model.to(device).train()
    net = conlst.Net(model, tok, prefix, a.max_length, device, amp_dtype)
    pool = data.targets[lang].pool
    b1, b2, c = a.s1_batch_size, a.s2_batch_size, conlst.NUM_CLASSES
    hc_idx = torch.arange(len(pool))
    hc_label = hc_idx % c  # every pool sample confident, classes round-robin: K real negatives each
    probs = torch.nn.functional.one_hot(torch.arange(b1) % c, c).float()
    comp = conlst.complementary_labels_eq4(probs, a.gamma, a.comp_label)
    neg_idx, neg_valid = conlst.sample_negatives_eq5(comp, hc_idx, hc_label, a.k_neg, a.neg_sharing)
    pick = pick or (lambda items, n: [i % len(items) for i in range(n)])
    anchors = [pool[i] for i in pick(pool, b1)]
    src1 = [data.source[i] for i in pick(data.source, b1)]
    tgt = [pool[i] for i in pick(pool, b2)]
    src2 = [data.source[i] for i in pick(data.source, a.s2_source_batch_size)]
    kinds = [("mask", "mixup")[i % 2] for i in range(b2)]
    batches = {"ft": (conlst.ft_step, conlst.make_ft_batch(net, src1)),
               "conl": (conlst.conl_step, conlst.make_conl_batch(net, pool, anchors, comp, neg_idx, neg_valid,
                                                                 [] if a.wo_clcs else src1[:a.s1_source_batch_size])),
               "fixmatch": (fixmatch_step, fixmatch_batch(net, a, tgt, src2)),
               "st": (conlst.st_step, conlst.make_st_batch(net, a, None, tgt, kinds, [i % c for i in range(b2)], src2))}
    opt = torch.optim.Adam(conlst.trainable(model), lr=0.0)

    def one_step(fn, batch: dict):
        def run() -> float:
            with utils.autocast(device, amp_dtype):
                loss, _ = fn(model, batch, a)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        return run

    return {name: one_step(fn, batch) for name, (fn, batch) in batches.items()}


def conlst_step_times(a, repeats: int = 3, lang: str | None = None) -> dict:
    """Seconds per step (median over `repeats` interleaved rounds, after one warm-up round) of
    ft vs conl (stage 1) and fixmatch vs st (stage 2), and the two ratios."""
    steps = conlst_steps(a, lang)
    times = time_steps(steps, repeats, warmup=1)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out["conl_over_ft"] = out["conl_s"] / out["ft_s"]
    out["st_over_fixmatch"] = out["st_s"] / out["fixmatch_s"]
    return out


def measure_conlst(args) -> dict:
    """Stage 2 (st_step) vs plain FixMatch and stage 1 (conl_step) vs plain fine-tuning, each
    pair on the same batch (conlst_steps), e5-small as in the CPU preset."""
    import conlst

    a = _text_args(conlst.Args, conlst.PRESETS, ["--preset", args.text_preset or "cpu", "--langs", "fr"])
    default = default_config(args, utils.resolve_device(args.device))
    steps = {}
    for prec, order in CONFIGS_TEXT:  # one model per configuration, each from seed 0: the same weights
        utils.seed_everything(0)

        def pick(items, n, grouped=order == "grouped"):  # premise + hypothesis characters, as conlst groups them
            return typical_batch([len(p[0]) + len(p[1] or "") for p in items], n, grouped)
        cfg = conlst_steps(dataclasses.replace(a, precision=prec), pick=pick)
        steps |= {f"{k}/{prec}/{order}": f for k, f in cfg.items()}
    times = time_steps(steps, args.reps)
    b2, b1 = a.s2_batch_size + a.s2_source_batch_size, a.s1_batch_size
    res = grid_result(times, "st", "fixmatch", b2, 1.3, default, model=a.model,
                      baseline="fixmatch_step (stage 2's baseline) and ft_step (stage 1's, = a stage-0 step)",
                      method="st_step (stage 2, Eq. 9-14) and conl_step (stage 1, Eq. 4-8)")
    stage1 = grid_result(times, "conl", "ft", b1, 0.0, default)
    return {**res, "stage1_step_s": stage1["method_step_s"], "ft_step_s": stage1["baseline_step_s"],
            "stage1_over_ft": stage1["ratio"], "stage1_samples_per_s": stage1["method_samples_per_s"],
            "ft_samples_per_s": stage1["baseline_samples_per_s"], "speedup_stage1": stage1["speedup_method"],
            "speedup_ft": stage1["speedup_baseline"],
            **{k.replace("method", "stage1").replace("baseline", "ft").replace("ratio", "stage1_over_ft"): v
               for k, v in stage1.items() if k.startswith(("fp32_", "bf16_"))}}


def measure_msmo(args) -> dict:
    """MSMO steps (adversarial phase with its critic updates; consistency phase) vs the ACS step
    (tagging CE), same CE batch, e5-small as in the CPU preset. Also counts encoder forward
    passes per step: the critic updates must reuse the step's features, not re-run the encoder."""
    import msmo

    a = _text_args(msmo.Args, msmo.PRESETS, ["--preset", args.text_preset or "cpu", "--lang", "fr"])
    device = utils.resolve_device(args.device)
    utils.seed_everything(0)
    data = msmo.load_acs_data(a)
    encoder, tok = msmo.xabsa_encoder(a.model, a.data_dir, a.domain)
    model = msmo.Tagger(encoder, len(msmo.tag_list(a.tagging)))
    if a.freeze_embeddings:
        msmo.freeze_word_embeddings(model)
    model.to(device).train()
    enc = msmo.encode_acs_data(a, data, tok)
    pool, pool_sides = enc.ce_pool, enc.ce_sides
    pair_lengths = [len(p.a.input_ids) + len(p.b.input_ids) for p in enc.pairs]
    batches = {}
    for order in ("random", "grouped"):
        idx = typical_batch([len(e.input_ids) for e in pool], a.batch_size, order == "grouped")
        items, sides = [pool[i] for i in idx], [pool_sides[i] for i in idx]
        if not (0 in sides and 1 in sides):  # the adversarial term needs both languages in the batch
            src, tgt = pool_sides.index(0), pool_sides.index(1)
            items[:2], sides[:2] = [pool[src], pool[tgt]], [0, 1]
        pairs = [enc.pairs[i] for i in typical_batch(pair_lengths, a.cons_batch, order == "grouped")]
        batches[order] = (msmo.tagging_batch(items, tok.pad_token_id, device, sides),
                          msmo.tagging_batch(items, tok.pad_token_id, device, sides, pairs))
    critic = msmo.Critic(encoder.config.hidden_size, encoder.config.hidden_dropout_prob, a.critic_clip).to(device)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=a.critic_lr or a.lr)
    calls = {"n": 0}
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    steps = {}
    for prec, order in CONFIGS_TEXT:
        dt, (batch, batch_pairs) = DTYPES[prec], batches[order]
        steps |= {
            f"msmo_adv/{prec}/{order}": _train_step(model.parameters(), lambda dt=dt, b=batch: msmo.msmo_step(
                model, critic, critic_opt, b, a, "adv", a.critic_steps, dt), device, dt),
            f"msmo_cons/{prec}/{order}": _train_step(model.parameters(), lambda dt=dt, b=batch_pairs: msmo.msmo_step(
                model, critic, critic_opt, b, a, "cons", a.critic_steps, dt), device, dt),
            f"acs/{prec}/{order}": _train_step(model.parameters(), lambda dt=dt, b=batch: msmo.ce_step(model, b, a, dt),
                                               device, dt)}
    default = default_config(args, device)
    key = "/".join(default)
    forwards = {}
    for k in ("msmo_adv", "msmo_cons", "acs"):
        calls["n"] = 0
        steps[f"{k}/{key}"]()
        forwards[k] = calls["n"]
    times = time_steps(steps, args.reps)
    res = grid_result(times, "msmo_adv", "acs", a.batch_size, 1.1, default, model=a.model, baseline="ce_step (ACS)",
                      method=f"msmo_step, adversarial phase with {a.critic_steps} critic updates")
    cons = grid_result(times, "msmo_cons", "acs", a.batch_size, 0.0, default)
    return {**res, "cons_step_s": cons["method_step_s"], "cons_over_acs": cons["ratio"],
            "critic_steps": a.critic_steps, "encoder_forwards_adv_step": forwards["msmo_adv"],
            "encoder_forwards_cons_step": forwards["msmo_cons"], "encoder_forwards_acs_step": forwards["acs"],
            "cons_pairs": a.cons_batch}


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
        summary = {"script": "benchmarks/speed.py", "method": args.method, "dataset": "-",
                   "setting": res.get("model", args.backbone),
                   "seed": args.seed, "primary_metric": "ratio", "final": {k: v for k, v in res.items()},
                   "best": {k: v for k, v in res.items()}, "wall_s": round(time.time() - t, 2)}
        utils.write_summary(run_dir, summary)
        for k, v in res.items():
            print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
