"""common.get_data (fetching the offline text data, verified) and the data-folder resolver.

Offline: the "mirror" and the "public repositories" are a local http.server on 127.0.0.1.
"""

import csv
import functools
import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common import get_data as gd
from common import utils

FEW = ["sick/SICK_trial.txt", "glue/RTE/dev.tsv", "cifar_n/CIFAR-100_human.labels.csv"]


class Server:
    """http.server on an ephemeral port in a thread, serving `root`; counts the GET requests."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(root):
        servers.append(Server(Path(root)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


# ------------------------------------------------------------------------------------------
# From a mirror
# ------------------------------------------------------------------------------------------
def test_mirror_fetch_verifies_and_skips(shared_data, serve, tmp_path, capsys):
    server = serve(shared_data)
    dest = tmp_path / "data"
    assert gd.main(["--to", str(dest), "--mirror", server.url, "--only", *FEW]) == 0
    for rel in FEW:
        assert (dest / rel).read_bytes() == (shared_data / rel).read_bytes()
    assert sorted(server.requests) == sorted("/" + rel for rel in FEW)  # the derived CSV comes as it is
    assert "3 files downloaded" in capsys.readouterr().out
    # A second run finds everything in place and downloads nothing.
    assert gd.main(["--to", str(dest), "--mirror", server.url, "--only", *FEW]) == 0
    assert len(server.requests) == len(FEW)
    assert "0 files downloaded, 3 already present" in capsys.readouterr().out
    # A wrong local copy is fetched again.
    (dest / FEW[0]).write_bytes(b"stale")
    assert gd.main(["--to", str(dest), "--mirror", server.url, "--only", FEW[0]]) == 0
    assert (dest / FEW[0]).read_bytes() == (shared_data / FEW[0]).read_bytes()
    assert not leftovers(dest)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_bad_mirror_file_is_rejected(shared_data, serve, tmp_path, capsys, damage):
    rel = "glue/RTE/dev.tsv"
    mirror = tmp_path / "mirror"
    (mirror / "glue" / "RTE").mkdir(parents=True)
    data = (shared_data / rel).read_bytes()
    if damage == "corrupt":
        (mirror / rel).write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncated":
        (mirror / rel).write_bytes(data[: len(data) // 2])
    server = serve(mirror)
    dest = tmp_path / "data"
    assert gd.main(["--to", str(dest), "--mirror", server.url, "--only", rel]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert err.startswith(f"error: {rel}: {server.url}{rel}: ")
    assert {"corrupt": "sha256", "truncated": "size", "missing": "HTTP 404"}[damage] in err
    assert not (dest / rel).exists() and not leftovers(tmp_path)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gd.main(["--to", str(tmp_path), "--only", "imagenet"])
    assert e.value.code == 2 and "agnews, cifar_n, glue" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# From the public repositories: copies, and DERIVED files rebuilt from a .pt pickle
# ------------------------------------------------------------------------------------------
def fake_repo_file(root: Path, repo: str, commit: str, path: str, data: bytes) -> None:
    target = root / repo / commit / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def test_public_source_and_derived_rebuild(serve, tmp_path, monkeypatch):
    """A copy comes from RAW_URL at the pinned commit; a derived CSV is rebuilt from a real
    torch.save'd pickle of numpy arrays and lists (as CIFAR-N's .pt files are), then verified."""
    labels = {"clean_label": np.array([3, 1, 4, 1]), "noisy_label": np.array([3, 5, 4, 1]), "coarse": [0, 1, 0, 1]}
    buf = io.BytesIO()
    torch.save(labels, buf)
    expected = b"train_index,clean_label,noisy_label,coarse\r\n0,3,3,0\r\n1,1,5,1\r\n2,4,4,0\r\n3,1,1,1\r\n"
    assert gd.pt_labels_to_csv(buf.getvalue()) == expected
    root = tmp_path / "github"
    fake_repo_file(root, "me/labels", "c0ffee", "data/labels.pt", buf.getvalue())
    fake_repo_file(root, "me/text", "abc123", "data/a b.txt", b"hello\n")
    rows = [{"path": "cifar_n/labels.csv", "sha256": hashlib.sha256(expected).hexdigest(), "size": len(expected),
             "repo": "me/labels", "source_path": "data/labels.pt", "commit": "c0ffee",
             "derived": "pt_labels_to_csv: test"},
            {"path": "sick/a.txt", "sha256": hashlib.sha256(b"hello\n").hexdigest(), "size": 6,
             "repo": "me/text", "source_path": "data/a b.txt", "commit": "abc123", "derived": ""}]
    manifest = tmp_path / "manifest.csv"
    for row in rows:
        row.update({"set": row["path"].split("/")[0], "dataset": "test", "license": "test"})
    gd.write_manifest(rows, manifest)
    server = serve(root)
    monkeypatch.setattr(gd, "RAW_URL", server.url + "{repo}/{commit}/{path}")
    dest = tmp_path / "data"
    assert gd.main(["--to", str(dest), "--manifest", str(manifest)]) == 0
    assert (dest / "cifar_n/labels.csv").read_bytes() == expected
    assert (dest / "sick/a.txt").read_bytes() == b"hello\n"
    assert "/me/text/abc123/data/a%20b.txt" in server.requests


def test_pickle_is_never_executed(tmp_path):
    """A .pt whose pickle calls os.system is refused before anything runs."""
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(gd.FetchError, match="os.system"):
        gd.pt_labels_to_csv(buf.getvalue())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# The manifest against the offline folder
# ------------------------------------------------------------------------------------------
def test_manifest_matches_shared_data(shared_data):
    rows = gd.read_manifest()
    regenerated = gd.manifest_from_provenance(shared_data / "PROVENANCE.md")
    assert rows == [{k: str(v) for k, v in r.items()} for r in regenerated]  # the checked-in manifest is current
    listed = {r["path"] for r in rows}
    on_disk = {str(p.relative_to(shared_data)) for p in shared_data.rglob("*") if p.is_file()}
    assert on_disk - listed == {"README.md", "PROVENANCE.md"} and not listed - on_disk
    bad = [r["path"] for r in rows if not gd.is_present(shared_data / r["path"], r)]
    assert not bad, f"differ from the manifest (size or sha256): {bad}"
    assert {r["set"] for r in rows} == set(utils.TEXT_DATA_SETS)
    with open(gd.MANIFEST, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == gd.COLUMNS


# ------------------------------------------------------------------------------------------
# Where the text data is looked for
# ------------------------------------------------------------------------------------------
def test_resolver_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIS_SHARED_DATA", raising=False)
    sibling = tmp_path / "shared" / "data"
    monkeypatch.setattr(utils, "shared_data_dir", lambda: sibling)
    local = tmp_path / "data"
    resolve = utils.resolve_text_data_dir

    assert resolve() == local  # nothing anywhere: ./data, where get_data puts it
    sibling.mkdir(parents=True)
    assert resolve() == sibling  # ../shared/data
    (local / "cifar-10-batches-py").mkdir(parents=True)
    assert resolve() == sibling  # a ./data with image data only does not count
    (local / "xabsa").mkdir()
    assert resolve() == local  # ./data holding text data comes before ../shared/data
    monkeypatch.setenv("LIS_SHARED_DATA", str(tmp_path / "env"))
    assert resolve() == tmp_path / "env"  # $LIS_SHARED_DATA before both
    assert resolve(None) == resolve("") == tmp_path / "env"
    assert resolve(tmp_path / "mine") == tmp_path / "mine"  # an explicit --data-dir is used as it is


def test_missing_file_message_names_get_data(tmp_path):
    from common.text_data import load_text_task

    with pytest.raises(utils.MissingError) as e:
        load_text_task("rte", "dev", data_dir=tmp_path, source="local")
    assert "python -m common.get_data --to" in str(e.value) and "docs/data.md" in str(e.value)
