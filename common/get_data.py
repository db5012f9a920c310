"""Fetch the offline text data (the layout of ../shared/data) onto any machine, verified.

    python -m common.get_data --to data                       # all sets, from the public repositories
    python -m common.get_data --to data --only xabsa glue     # some sets
    python -m common.get_data --to data --mirror URL          # from a copy of the folder served over HTTP

Every file is listed in `common/data_manifest.csv`: its path in the folder, size, sha256, the
public repository, path and commit it is a byte copy of, and its license. A few files are
DERIVED (the `derived` column says how): they are rebuilt from their source here, then
verified like the others. Files already present with the right sha256 are skipped; a file is
written to a temporary name beside it and renamed only once verified, so a failure (one line
naming the file, the URL and the reason; exit code 3) never leaves a partial file.
Standard library only (and tqdm for the progress bar). See docs/data.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import pickle
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from array import array
from pathlib import Path

from tqdm import tqdm

MANIFEST = Path(__file__).with_name("data_manifest.csv")
COLUMNS = ("path", "set", "dataset", "size", "sha256", "repo", "source_path", "commit", "license", "derived")
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
EXIT_FAILED = 3


class FetchError(Exception):
    """One file could not be fetched or did not verify."""


# ------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------
def read_manifest(path: Path = MANIFEST) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def manifest_from_provenance(provenance: Path) -> list[dict]:
    """The manifest rows of shared/data's PROVENANCE.md (its table: file, dataset, repo, source
    path, commit, bytes, lines, sha256, license; DERIVED rows name the transformation in the
    dataset column and give the source file's size after its path)."""
    rows = []
    for line in Path(provenance).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or not re.fullmatch(r"[0-9a-f]{64}", cells[7]):
            continue  # not a file row (title, header, separator, notes)
        path, dataset, repo, source_path, commit, size, _lines, sha256, license = cells
        derived = ""
        if "DERIVED" in dataset:
            how = re.search(r"DERIVED:\s*([^)]*)", dataset).group(1).strip()
            dataset = re.sub(r"\s*\(DERIVED[^)]*\)", "", dataset)
            source_path = re.sub(r"\s*\(.*\)$", "", source_path)
            if not source_path.endswith(".pt"):
                raise ValueError(f"{provenance}: {path}: no rebuild known for a DERIVED file from {source_path}")
            derived = f"pt_labels_to_csv: {how}; CSV columns train_index, then the pickle's arrays in order"
        rows.append({"path": path, "set": path.split("/")[0], "dataset": dataset, "size": size, "sha256": sha256,
                     "repo": repo, "source_path": source_path, "commit": commit, "license": license,
                     "derived": derived})
    return rows


def write_manifest(rows: list[dict], path: Path = MANIFEST) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def select(rows: list[dict], only: list[str] | None) -> list[dict]:
    """The rows under the given sets, folders or files (all rows without `only`); ValueError
    for an item that matches nothing."""
    if not only:
        return rows
    chosen = []
    for item in only:
        item = item.strip("/")
        hits = [r for r in rows if r["path"] == item or r["path"].startswith(item + "/")]
        if not hits:
            sets = ", ".join(sorted({r["set"] for r in rows}))
            raise ValueError(f"--only {item}: not in the manifest; sets are {sets} (or a folder or file below one)")
        chosen += [r for r in hits if r not in chosen]
    return chosen


# ------------------------------------------------------------------------------------------
# DERIVED files: CIFAR-N label arrays from a torch .pt pickle, decoded without executing it
# ------------------------------------------------------------------------------------------
class _Array:
    """Stands in for numpy.ndarray: keeps the shape, dtype and raw bytes that the pickle sets."""

    def __init__(self, *args):
        self.values: list[int] = []

    def __setstate__(self, state):
        _version, shape, dtype, fortran_order, raw = state
        if dtype.code not in _INT_CODES or len(shape) != 1 or fortran_order:
            raise FetchError(f"unexpected array in the pickle (dtype {dtype.code}, shape {shape})")
        values = array(_INT_CODES[dtype.code], raw)
        if dtype.byteorder in "<>" and dtype.byteorder != {"little": "<", "big": ">"}[sys.byteorder]:
            values.byteswap()
        self.values = values.tolist()


class _DType:
    """Stands in for numpy.dtype (only integer dtypes occur)."""

    def __init__(self, code, align=False, copy=True):
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        self.byteorder = state[1]


_INT_CODES = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q"}
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"): lambda cls, shape, dtype: _Array(),
            ("numpy._core.multiarray", "_reconstruct"): lambda cls, shape, dtype: _Array(),
            ("numpy", "ndarray"): _Array, ("numpy", "dtype"): _DType,
            ("_codecs", "encode"): lambda text, encoding: text.encode(encoding)}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only the stand-ins above: any other global in the pickle is an error, so no code of
    the file runs (unlike torch.load / pickle.load)."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise FetchError(f"the pickle refers to {module}.{name}, which is not a label array")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise FetchError("the pickle holds torch tensors, not numpy label arrays")


def pt_labels_to_csv(pt_bytes: bytes) -> bytes:
    """CIFAR-N's CIFAR-10_human.pt / CIFAR-100_human.pt (torch.save of {name: labels}) as
    CSV: a header `train_index,<names in the pickle's order>`, one row per training image, CRLF."""
    with zipfile.ZipFile(io.BytesIO(pt_bytes)) as zf:
        name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
        if name is None:
            raise FetchError("not a torch zip file (no data.pkl inside)")
        arrays = _SafeUnpickler(io.BytesIO(zf.read(name))).load()
    # CIFAR-10N: numpy int64 arrays; CIFAR-100N: two arrays and two plain lists (coarse labels).
    columns = [a.values if isinstance(a, _Array) else a for a in arrays.values()] if isinstance(arrays, dict) else []
    if not columns or not all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
        raise FetchError("the pickle is not a dict of label arrays of one length")
    out = io.StringIO()
    writer = csv.writer(out)  # CRLF line ends, as the shared copy has them
    writer.writerow(["train_index", *arrays])
    writer.writerows([i, *row] for i, row in enumerate(zip(*columns)))
    return out.getvalue().encode("ascii")


DERIVATIONS = {"pt_labels_to_csv": pt_labels_to_csv}


# ------------------------------------------------------------------------------------------
# Fetching one file
# ------------------------------------------------------------------------------------------
def source_url(row: dict, mirror: str | None) -> str:
    """Where a file comes from: the same path under the mirror (which serves derived files
    themselves), or the raw file of the public repository at the pinned commit."""
    if mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(row["path"])
    return RAW_URL.format(repo=row["repo"], commit=row["commit"], path=urllib.parse.quote(row["source_path"]))


def download(url: str, timeout: float = 60.0) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "lis-get-data"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise FetchError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(str(getattr(e, "reason", e))) from None


def check(data: bytes, row: dict) -> None:
    if len(data) != int(row["size"]):
        raise FetchError(f"size {len(data)} bytes, expected {row['size']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != row["sha256"]:
        raise FetchError(f"sha256 {digest}, expected {row['sha256']}")


def is_present(dest: Path, row: dict) -> bool:
    """The file is there with the manifest's size and sha256."""
    if not dest.is_file() or dest.stat().st_size != int(row["size"]):
        return False
    return hashlib.sha256(dest.read_bytes()).hexdigest() == row["sha256"]


def fetch_one(row: dict, to: Path, mirror: str | None) -> None:
    """Download (and for a DERIVED file from the public source, rebuild) one file, verify it
    and move it into place; on failure nothing is left behind."""
    data = download(source_url(row, mirror))
    if row["derived"] and not mirror:
        try:
            data = DERIVATIONS[row["derived"].split(":")[0]](data)
        except Exception as e:  # any failure to parse the downloaded file (untrusted input)
            raise FetchError(f"cannot rebuild it from the downloaded {row['source_path']}: {e}") from None
    check(data, row)
    dest = to / row["path"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def get_data(rows: list[dict], to: Path, mirror: str | None = None) -> tuple[int, int]:
    """Fetch the files of these manifest rows into `to`; returns (downloaded, already present).
    Raises FetchError naming the file, the URL and the reason at the first failure."""
    downloaded = present = 0
    bar = tqdm(rows, unit="file", desc="get_data", file=sys.stderr)
    for row in bar:
        bar.set_postfix_str(row["path"], refresh=False)
        if is_present(to / row["path"], row):
            present += 1
            continue
        try:
            fetch_one(row, to, mirror)
        except (FetchError, OSError) as e:
            bar.close()
            raise FetchError(f"{row['path']}: {source_url(row, mirror)}: {e}") from None
        downloaded += 1
    bar.close()
    return downloaded, present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.get_data",
        description="Download the offline text data (the layout of ../shared/data) into DIR, each file\n"
                    "verified against common/data_manifest.csv (size and sha256). Files already there and\n"
                    "correct are skipped. Exit code 3 on a failure, with nothing partial left behind.\n"
                    "See docs/data.md.",
        epilog="examples:\n  python -m common.get_data --to data\n"
               "  python -m common.get_data --to data --only xabsa glue/RTE\n"
               "  python -m common.get_data --to data --mirror https://cache.example.org/lis-data/\n"
               "then run the scripts with --data-dir data (or from this folder: ./data is looked for by default)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", default="data", metavar="DIR", help="folder to fill (default: %(default)s)")
    parser.add_argument("--mirror", metavar="URL",
                        help="base URL serving the same layout as shared/data (http://, https:// or file://), "
                             "derived files included; default: each file's public repository at its pinned commit")
    parser.add_argument("--only", nargs="+", metavar="SET",
                        help="fetch only these sets (agnews, cifar_n, glue, senteval_transfer, sick, sts, xabsa, "
                             "xnli), or folders or files below them (e.g. glue/RTE); default: everything")
    parser.add_argument("--manifest", default=str(MANIFEST), metavar="CSV", help="default: common/data_manifest.csv")
    parser.add_argument("--make-manifest", metavar="PROVENANCE_MD",
                        help="instead of fetching: (re)write --manifest from shared/data's PROVENANCE.md")
    args = parser.parse_args(argv)

    if args.make_manifest:
        rows = manifest_from_provenance(Path(args.make_manifest))
        write_manifest(rows, Path(args.manifest))
        print(f"wrote {args.manifest}: {len(rows)} files")
        return 0
    try:
        rows = select(read_manifest(Path(args.manifest)), args.only)
    except ValueError as e:
        parser.error(str(e))
    try:
        downloaded, present = get_data(rows, Path(args.to), args.mirror)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.to}: {downloaded} files downloaded, {present} already present and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
