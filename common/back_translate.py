"""Back-translations for conlst.py's stage 2: target -> pivot -> target with mBART-50
many-to-many (greedy decoding), written as the TSV file `conlst.py --bt mbart` reads.

    python -m common.back_translate --langs fr de sw         # XNLI dev (conlst's pool), pivot English (GPU)
    python -m common.back_translate --langs en               # an English target: pivot French
    python -m common.back_translate --langs fr --split test --out bt_fr.tsv   # for conlst.py --bt file --bt-file

Every premise and hypothesis of the language's XNLI split is translated once into
`<cache dir>/<model>.<lang>.via-<pivot>.tsv` (cache dir: --cache-dir, default
~/.cache/lis/backtranslation; lines 'original<TAB>back-translation', whitespace normalised);
sentences already in the file are not translated again, and the file is rewritten atomically.
mBART-50 has no Greek or Bulgarian (the paper used Google Translate): give those to conlst.py
as a precomputed file with --bt file --bt-file PATH.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from common import utils
from common.text_data import hub_unavailable_reason, load_text_task
from common.text_models import default_cache_dir
from common.utils import MissingError

MBART50_CODES = {"ar": "ar_AR", "de": "de_DE", "en": "en_XX", "es": "es_XX", "fr": "fr_XX", "hi": "hi_IN",
                 "ru": "ru_RU", "sw": "sw_KE", "th": "th_TH", "tr": "tr_TR", "ur": "ur_PK", "vi": "vi_VN",
                 "zh": "zh_CN"}  # XNLI languages that mBART-50 covers: no el, no bg
DEFAULT_MODEL = "facebook/mbart-large-50-many-to-many-mmt"


def clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def read_translations(path: str | Path) -> dict[str, str]:
    """A TSV of 'original<TAB>translation' lines (tabs and newlines inside a text are spaces)."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"--bt-file {path}: not found (expected TSV lines 'original<TAB>back-translation')")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        src, sep, tgt = line.partition("\t")
        if not sep or "\t" in tgt:
            raise MissingError(f"{path}:{i}: expected 'original<TAB>back-translation'")
        out[clean(src)] = clean(tgt)
    return out


def write_translations(path: str | Path, mapping: dict[str, str]) -> None:
    utils.atomic_write_text(path, "".join(f"{clean(s)}\t{clean(t)}\n" for s, t in mapping.items()))


def pivot_of(lang: str, pivot: str = "en") -> str:
    """The pivot language of `lang` (French for a target equal to the pivot)."""
    return pivot if lang != pivot else "fr"


def cache_file(cache_dir: str, model: str, lang: str, pivot: str) -> Path:
    """Where the back-translations of `lang` through `pivot_of(lang, pivot)` are kept."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "backtranslation"
    return folder / f"{model.replace('/', '__')}.{lang}.via-{pivot_of(lang, pivot)}.tsv"


def mbart_translator(model_name: str, device, batch_size: int, max_length: int) -> Callable:
    """translate(texts, src_lang, tgt_lang) -> texts, with mBART-50 many-to-many (greedy decoding).
    Loaded on first use; offline and not cached it fails with one line."""
    import torch
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def load():
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        offline = hub_unavailable_reason() is not None
        try:
            state["tok"] = AutoTokenizer.from_pretrained(model_name, local_files_only=offline)
            model = AutoModelForSeq2SeqLM.from_pretrained(model_name, local_files_only=offline)
            state["model"] = model.to(device).eval()
        except (OSError, ValueError) as e:
            why = f"the hub is {hub_unavailable_reason()}" if offline else str(e).splitlines()[0][:150]
            raise MissingError(f"back-translation model {model_name}: could not be loaded ({why}); run once with "
                               "network to cache it, or give conlst.py --bt file --bt-file PATH, or --bt off") from None

    @torch.no_grad()
    def translate(texts: list[str], src: str, tgt: str) -> list[str]:
        if not state:
            load()
        tok, model = state["tok"], state["model"]
        tok.src_lang = MBART50_CODES[src]
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc=f"mBART {src}->{tgt}", leave=False, disable=None):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length).to(device)
            gen = model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids(MBART50_CODES[tgt]),
                                 num_beams=1, do_sample=False, max_new_tokens=max_length)
            out += tok.batch_decode(gen, skip_special_tokens=True)
        return out

    return translate


def back_translate(sentences: list[str], lang: str, pivot: str, translate: Callable,
                   cache: Path | None) -> dict[str, str]:
    """{sentence: back-translation} for every sentence, lang -> pivot -> lang; already cached
    sentences are not translated again, and the cache is rewritten (atomically) when it grew."""
    cached = read_translations(cache) if cache is not None and cache.is_file() else {}
    todo = sorted({clean(s) for s in sentences} - set(cached))
    if todo:
        there = translate(todo, lang, pivot)
        back = translate(there, pivot, lang)
        cached.update({s: clean(b) for s, b in zip(todo, back)})
        if cache is not None:
            write_translations(cache, cached)
    return cached


def main(argv: list[str] | None = None, translator: Callable | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--langs", nargs="+", required=True, choices=sorted(MBART50_CODES), help="XNLI target languages")
    ap.add_argument("--split", default="dev", choices=["dev", "test"], help="XNLI split (conlst's --pool-split)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="translation model (conlst's --bt-model)")
    ap.add_argument("--pivot", default="en", choices=sorted(MBART50_CODES), help="conlst's --bt-pivot")
    ap.add_argument("--cache-dir", default="", help="conlst's --bt-cache-dir (default ~/.cache/lis/backtranslation)")
    ap.add_argument("--out", default="", help="write this file instead of the cache file (one language only)")
    ap.add_argument("--batch-size", type=int, default=32, help="sentences per generation batch")
    ap.add_argument("--max-length", type=int, default=128, help="max tokens per sentence, in and out")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--data-dir", default="", help="folder of the offline text data (conlst's --data-dir)")
    ap.add_argument("--data-source", default="auto", choices=["auto", "local", "hub"])
    a = ap.parse_args(argv)
    if a.out and len(a.langs) > 1:
        ap.error("--out: give one language")
    translate = translator or mbart_translator(a.model, utils.resolve_device(a.device), a.batch_size, a.max_length)
    for lang in a.langs:
        ex = load_text_task(f"xnli-{lang}", a.split, Path(a.data_dir) if a.data_dir else None, a.data_source)
        path = Path(a.out) if a.out else cache_file(a.cache_dir, a.model, lang, a.pivot)
        done = back_translate([s for e in ex for s in (e.text_a, e.text_b)], lang, pivot_of(lang, a.pivot), translate,
                              path)
        print(f"{lang}: {len(done)} back-translations -> {path}")
    return 0


def load_backtranslations(args: Any, lang: str, pool: list[tuple[str, str]]) -> dict[str, str]:
    """Back-translations of conlst.py's pool sentences (keys: whitespace-normalised originals): --bt-file,
    or for --bt mbart the file this module writes, which must hold every one."""
    if args.bt == "file":
        return read_translations(args.bt_file)
    if lang not in MBART50_CODES:
        raise MissingError(f"back-translation ({lang}): mBART-50 does not cover this language (the paper used "
                           "Google Translate); give precomputed ones with --bt file --bt-file PATH, or use --wo-bt")
    path = cache_file(args.bt_cache_dir, args.bt_model, lang, args.bt_pivot)
    bt = read_translations(path) if path.is_file() else {}
    missing = {clean(s) for pair in pool for s in pair} - set(bt)
    if missing:
        extra = {"--cache-dir": args.bt_cache_dir, "--data-dir": args.data_dir}
        cmd = (f"python -m common.back_translate --langs {lang} --split {args.pool_split} --model {args.bt_model} "
               f"--pivot {args.bt_pivot} --batch-size {args.bt_batch_size} --max-length {args.max_length}"
               + "".join(f" {k} {v}" for k, v in extra.items() if v))
        raise MissingError(f"back-translation ({lang}): {path} lacks {len(missing)} of the pool's sentences; write "
                           f"it with: {cmd} (or give --bt file --bt-file PATH, or --wo-bt)")
    return bt


def check_bt_args(args: Any) -> None:
    """conlst.py's back-translation flags: --bt file needs --bt-file and the reverse; --bt-pivot an mBART-50 code."""
    from common.utils import UsageError

    if args.bt == "file" and not args.bt_file:
        raise UsageError("--bt file: needs --bt-file PATH (TSV 'original<TAB>back-translation')")
    if args.bt_file and args.bt != "file":
        raise UsageError(f"--bt-file: given with --bt {args.bt}; use --bt file")
    if args.bt_pivot not in MBART50_CODES and args.bt == "mbart":
        raise UsageError(f"--bt-pivot {args.bt_pivot}: allowed are {', '.join(MBART50_CODES)}")


def bt_pair(bt: dict[str, str] | None, pair: tuple[str, str]) -> tuple[str, str] | None:
    """The back-translated pair, or None when either sentence has no translation."""
    if not bt:
        return None
    a, b = bt.get(clean(pair[0])), bt.get(clean(pair[1]))
    return (a, b) if a and b else None


if __name__ == "__main__":
    with utils.cli_errors():
        raise SystemExit(main())
