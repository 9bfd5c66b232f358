"""The command line under hostile input: every mistake gets one line, the right exit code, and
leaves the disk as it was (or, for interruptions and crashes, a resumable partial directory).

Most cases run `robustdissect.cli.main` in-process; the lock, Ctrl-C and kill -9 tests start real
processes, because only a second process can observe a lock and only a signal interrupts one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robustdissect.data.files import MAX_INPUT_ENV
from robustdissect.errors import UserError
from robustdissect.runs import LOCK, MARKER

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("robustdissect")
OVERVIEW = "stages: [overview]\nn: 20\n"


# -- helpers -----------------------------------------------------------------------------------
def assert_one_line(code: int, err: str, expect_code: int, needle: str) -> str:
    """Exactly one line on stderr, from robustdissect, holding `needle`; no traceback."""
    assert code == expect_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("robustdissect: "), err
    assert needle.lower() in lines[0].lower(), err
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (links by target, folders as 'dir')."""
    state: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


def good_images(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 8, 8), dtype=np.float32), (np.arange(n) % 3).astype(np.int64)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grayscale pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def cifar_dir(root: Path, labels: list[int], payload: bytes | None = None) -> Path:
    """Six tiny CIFAR-10 python batches (2 images each) with the given labels."""
    d = root / "cifar"
    d.mkdir()
    batch = {b"data": np.zeros((len(labels), 3072), dtype=np.uint8), b"labels": labels}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(payload if payload is not None else pickle.dumps(batch))
    return d


def fake_run(root: Path, results: object, files: dict[str, bytes] | None = None) -> Path:
    """A run directory whose results.json is `results` (JSON-encoded unless it is bytes)."""
    run = root / "fake"
    (run / "tables").mkdir(parents=True)
    (run / "figures").mkdir()
    data = results if isinstance(results, bytes) else json.dumps(results).encode()
    (run / "results.json").write_bytes(data)
    for rel, content in (files or {}).items():
        (run / rel).write_bytes(content)
    return run


def stage(**entry: object) -> dict[str, object]:
    return {"schema_version": 1, "model": "m", "stages": {"s": {"title": "S", **entry}}}


def marked_run(path: Path) -> Path:
    """A finished run directory as robustdissect leaves it (marker and results)."""
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps({"tool": "robustdissect", "run_id": "old"}))
    (path / "results.json").write_text("{}")
    return path


# -- the cases ---------------------------------------------------------------------------------
Setup = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup
    needle: str
    code: int = 2


def _yaml(text: str | bytes, name: str = "cfg.yaml") -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        p = tmp / name
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(p)

    return make


def run_config(text: str | bytes) -> Setup:
    return lambda tmp: ["run", "--config", _yaml(text)(tmp), "--out", "out"]


def train_config(text: str | bytes) -> Setup:
    return lambda tmp: ["train", "--config", _yaml(text)(tmp), "--out", "out"]


def npz_run(**arrays: np.ndarray) -> Setup:
    return lambda tmp: ["run", "--data", "npz", "--data-dir", str(write_npz(tmp / "d.npz", **arrays)), "--out", "out"]


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def zip_of(*members: tuple[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive of (name, content) members, as numpy.savez would write them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, content in members:
            zf.writestr(name, content)
    return buf.getvalue()


def write_npz_bomb(path: Path, images: int = 972_800, side: int = 64) -> Path:
    """An .npz whose member 'x' declares and really holds (images, 1, side, side) uint8 zeros
    (3.7 GiB by default) in a file of a few MB: one deflate block of 1024 zero images, made once
    and repeated (a full flush resets the compressor, so every copy is the same bytes). The zip
    structures are written by hand, below 4 GiB so no zip64 is needed; CRCs are not checked
    before the data would be read, so zeros stand in for them."""
    header = npy_header((images, 1, side, side), "|u1")
    per_block = 1024
    assert images % per_block == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(per_block * side * side)) + c.flush(zlib.Z_FULL_FLUSH)
    stream += block * (images // per_block) + c.flush()
    x_size = len(header) + images * side * side
    assert x_size < 2**32
    y = npy_bytes(np.zeros(images, dtype=np.uint8))
    members = [(b"x.npy", stream, x_size, zipfile.ZIP_DEFLATED, 0), (b"y.npy", y, len(y), 0, zlib.crc32(y))]
    body, central = b"", b""
    for name, data, size, method, crc in members:
        local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(name), 0)
        central += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), size, len(name), 0, 0, 0, 0, 0,
            len(body),
        ) + name  # fmt: skip
        body += local + name + data
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path


def npz_bomb_run(images: int = 972_800, side: int = 64) -> Setup:
    def setup(tmp: Path) -> list[str]:
        bomb = write_npz_bomb(tmp / "bomb.npz", images, side)
        return ["run", "--data", "npz", "--data-dir", str(bomb), "--out", "out"]

    return setup


def with_env(setup: Setup, name: str, value: str) -> Setup:
    """`setup`, run with the environment variable NAME=VALUE (reset by the `work` fixture)."""

    def wrapped(tmp: Path) -> list[str]:
        os.environ[name] = value
        return setup(tmp)

    return wrapped


def raw_npz_run(data: bytes) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "d.npz").write_bytes(data)
        return ["run", "--data", "npz", "--data-dir", str(tmp / "d.npz"), "--out", "out"]

    return setup


def folder_run(files: dict[str, bytes]) -> Setup:
    def setup(tmp: Path) -> list[str]:
        for rel, content in files.items():
            (tmp / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "imgs" / rel).write_bytes(content)
        (tmp / "imgs").mkdir(exist_ok=True)
        return ["run", "--data", "image-folder", "--data-dir", str(tmp / "imgs"), "--out", "out"]

    return setup


def cifar_run(labels: list[int], payload: bytes | None = None) -> Setup:
    return lambda tmp: ["run", "--data", "cifar10", "--data-dir", str(cifar_dir(tmp, labels, payload)), "--out", "out"]


def report_of(results: object, files: dict[str, bytes] | None = None) -> Setup:
    return lambda tmp: ["report", str(fake_run(tmp, results, files))]


def with_file(name: str, argv: list[str], content: bytes = b"precious\n") -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return argv

    return setup


def with_user_folder(argv: list[str], name: str = "thesis") -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / name / "chapters").mkdir(parents=True)
        (tmp / name / "chapters" / "one.tex").write_text("years of work\n")
        (tmp / name / "notes.txt").write_text("do not delete\n")
        return argv

    return setup


def symlinked_table(tmp: Path) -> list[str]:
    run = fake_run(tmp, stage(tables=[{"file": "tables/t.csv", "show": True}]))
    (run / "tables" / "t.csv").symlink_to("/etc/passwd")
    return ["report", str(run)]


def symlinked_results(tmp: Path) -> list[str]:
    (tmp / "secret.json").write_text('{"stages": {}}')
    run = tmp / "linked"
    run.mkdir()
    (run / "results.json").symlink_to(tmp / "secret.json")
    return ["report", str(run)]


def symlinked_out(tmp: Path) -> list[str]:
    (tmp / "target").mkdir()
    (tmp / "out").symlink_to(tmp / "target")
    return ["run", "--out", "out", "--overwrite"]


def cwd_out(tmp: Path) -> list[str]:
    return ["run", "--out", str(tmp)]


def idx_truncated(tmp: Path) -> list[str]:
    d = tmp / "mnist"
    d.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (d / stem).write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 10, 28, 28) + b"\x00" * 100)
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00" * 10)
    return ["run", "--data", "mnist", "--data-dir", str(d), "--out", "out"]


def idx_files(images: bytes, labels: bytes | None = None) -> Setup:
    """MNIST IDX files in a folder, gzipped (the train images as given, the rest small and valid)."""

    def setup(tmp: Path) -> list[str]:
        import gzip

        d = tmp / "mnist"
        d.mkdir()
        small = b"\x00\x00\x08\x03" + struct.pack(">III", 10, 28, 28) + bytes(7840)
        small_labels = b"\x00\x00\x08\x01" + struct.pack(">I", 10) + bytes(10)
        for stem, content in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels or small_labels),
                              ("t10k-images-idx3-ubyte", small), ("t10k-labels-idx1-ubyte", small_labels)):  # fmt: skip
            (d / f"{stem}.gz").write_bytes(gzip.compress(content, compresslevel=1))
        return ["run", "--data", "mnist", "--data-dir", str(d), "--out", "out"]

    return setup


def cifar_tar(members: list[tuple[str, int, bytes]]) -> Setup:
    """A cifar-10-python.tar.gz of (name, declared size, data) members (headers can lie)."""

    def setup(tmp: Path) -> list[str]:
        import gzip
        import tarfile

        raw = b""
        for name, size, data in members:
            info = tarfile.TarInfo(name)
            info.size = size
            raw += info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)
        (tmp / "c.tar.gz").write_bytes(gzip.compress(raw + bytes(1024)))
        return ["run", "--data", "cifar10", "--data-dir", str(tmp / "c.tar.gz"), "--out", "out"]

    return setup


x_ok, y_ok = good_images()
X_NPY, Y_NPY = npy_bytes(x_ok), npy_bytes(y_ok)
HUGE_HEADER = npy_header((10**12, 28, 28), "<f4")
EVIL_YAML = "!!python/object/apply:os.system ['touch pwned']\n"
ALIAS_BOMB = "model_args:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)
)

CASES = [
    # the parser's own errors
    Case("parse-n-not-int", lambda t: ["run", "--n", "ten", "--out", "out"], "'--n'"),
    Case("parse-n-zero", lambda t: ["run", "--n", "0", "--out", "out"], "--n"),
    Case("parse-seed-negative", lambda t: ["run", "--seed", "-1", "--out", "out"], "--seed"),
    Case("parse-unknown-option", lambda t: ["run", "--no-such-flag"], "no such option"),
    Case("parse-unknown-command", lambda t: ["frobnicate"], "no such command"),
    Case("parse-report-missing-argument", lambda t: ["report"], "missing argument"),
    Case("parse-config-without-value", lambda t: ["run", "--config"], "requires an argument"),
    Case("parse-evaluate-steps-zero", lambda t: ["evaluate", "--steps", "0", "--out", "out"], "--steps"),
    Case("parse-sensitivity-n-negative", lambda t: ["sensitivity", "--n", "-3", "--out", "out"], "--n"),
    Case("parse-train-epochs-negative", lambda t: ["train", "--epochs", "-1", "--out", "out"], "--epochs"),
    Case("parse-train-epochs-text", lambda t: ["train", "--epochs", "abc", "--out", "out"], "--epochs"),
    Case("parse-train-batch-size-zero", lambda t: ["train", "--batch-size", "0", "--out", "out"], "--batch-size"),
    # --out
    Case("out-is-a-file", with_file("out", ["run", "--out", "out"]), "is a file"),
    Case("out-is-a-file-overwrite", with_file("out", ["run", "--out", "out", "--overwrite"]), "is a file"),
    Case("out-dot", lambda t: ["run", "--out", "."], "new run directory"),
    Case("out-dot-overwrite", lambda t: ["run", "--out", ".", "--overwrite"], "new run directory"),
    Case("out-dotdot", lambda t: ["run", "--out", ".."], "new run directory"),
    Case("out-empty", lambda t: ["run", "--out", ""], "new run directory"),
    Case("out-root", lambda t: ["run", "--out", "/", "--overwrite"], "new run directory"),
    Case("out-cwd-absolute", cwd_out, "current directory"),
    Case("out-inside-a-file", with_file("f", ["run", "--out", "f/sub"]), "is a file, not a directory"),
    Case("out-symlink", symlinked_out, "symbolic link"),
    Case(
        "out-user-folder-overwrite", with_user_folder(["run", "--out", "thesis", "--overwrite"]), "not a robustdissect"
    ),
    Case("out-user-folder", with_user_folder(["run", "--out", "thesis"]), "already exists"),
    Case("out-user-partial", with_user_folder(["run", "--out", "thesis"], "thesis.partial"), "not created by"),
    Case(
        "out-user-partial-overwrite",
        with_user_folder(["run", "--out", "thesis", "--overwrite"], "thesis.partial"),
        "not created by",
    ),
    Case(
        "out-user-partial-resume",
        with_user_folder(["run", "--out", "thesis", "--resume"], "thesis.partial"),
        "not created by",
    ),
    Case("out-existing-run", lambda t: (marked_run(t / "done"), ["run", "--out", "done"])[1], "already exists"),
    Case("evaluate-out-dot", lambda t: ["evaluate", "--out", "."], "new run directory"),
    Case("sensitivity-out-file", with_file("s", ["sensitivity", "--out", "s"]), "is a file"),
    Case("train-out-file", with_file("o", ["train", "--out", "o", "--epochs", "1"]), "is a file"),
    Case("train-out-inside-file", with_file("f", ["train", "--out", "f/sub", "--epochs", "1"]), "is a file"),
    Case("train-out-not-empty", with_user_folder(["train", "--out", "thesis", "--epochs", "1"]), "not empty"),
    Case("train-resume-nothing", lambda t: ["train", "--resume", "nothing"], "nothing to resume"),
    Case("train-out-and-resume", lambda t: ["train", "--out", "a", "--resume", "b"], "not both"),
    Case("train-no-out", lambda t: ["train", "--epochs", "1"], "pass --out"),
    # run --config
    Case("config-missing", lambda t: ["run", "--config", "none.yaml", "--out", "out"], "does not exist"),
    Case("config-is-a-folder", lambda t: (Path(t / "c").mkdir(), ["run", "--config", "c", "--out", "o"])[1], "not a"),
    Case("config-invalid-yaml", run_config("n: [unclosed\n"), "not valid YAML"),
    Case("config-python-tag", run_config(EVIL_YAML), "not valid YAML"),
    Case("config-not-utf8", run_config(b"n: \xff\xfe\x00\n"), "cannot read"),
    Case("config-a-list", run_config("- n\n- 3\n"), "must be a mapping"),
    Case("config-a-scalar", run_config("42\n"), "must be a mapping"),
    Case("config-unknown-key", run_config("modle: smallcnn\n"), "did you mean: model"),
    Case("config-n-text", run_config("n: abc\n"), "n must be"),
    Case("config-n-negative", run_config("n: -3\n"), "n must be"),
    Case("config-batch-size-zero", run_config("batch_size: 0\n"), "batch_size must be"),
    Case("config-seed-float", run_config("seed: 1.5\n"), "seed must be"),
    Case("config-split", run_config("split: holdout\n"), "split must be"),
    Case("config-stages-number", run_config("stages: 5\n"), "stages"),
    Case("config-stage-options-number", run_config("stages: {overview: 5}\n"), "must be a mapping"),
    Case("config-unknown-stage", run_config("stages: [overveiw]\n"), "unknown stage"),
    Case("config-device-absent", run_config("device: cuda:99\n"), "not available"),
    Case("config-device-malformed", run_config("device: banana\n"), "device must be"),
    Case("config-model-args-number", run_config("model_args: 5\n"), "model_args must be"),
    Case("config-quick-text", run_config("quick: sometimes\n"), "quick must be"),
    Case("config-dataset-number", run_config("dataset: 5\n"), "dataset must be"),
    Case("config-alias-bomb", run_config(ALIAS_BOMB), "more than"),
    Case("config-too-large", run_config("n: 3\n" + "# padding\n" * 110_000), "larger than 1 MiB"),
    Case("train-config-too-large", train_config("epochs: 3\n" + "# padding\n" * 110_000), "larger than 1 MiB"),
    Case("config-deeply-nested", run_config("n: " + "[" * 3000 + "]" * 3000 + "\n"), "nested too deeply"),
    # train --config and options
    Case("train-config-invalid-yaml", train_config("epochs: [1\n"), "not valid YAML"),
    Case("train-config-python-tag", train_config(EVIL_YAML), "not valid YAML"),
    Case("train-config-a-list", train_config("- 1\n"), "must hold a mapping"),
    Case("train-config-epochs-text", train_config("epochs: abc\n"), "epochs must be"),
    Case("train-config-lr-nan", train_config("lr: .nan\n"), "lr must be"),
    Case("train-config-momentum", train_config("momentum: 2\n"), "momentum must be"),
    Case("train-config-unknown-key", train_config("epoch: 3\n"), "did you mean: epochs"),
    Case("train-lr-nan", lambda t: ["train", "--lr", "nan", "--out", "o"], "lr must be"),
    Case("train-lr-inf", lambda t: ["train", "--lr", "inf", "--out", "o"], "lr must be"),
    Case("train-unknown-objective", lambda t: ["train", "--objective", "patt", "--out", "o"], "unknown objective"),
    Case("train-unknown-model", lambda t: ["train", "--model", "smallcnnn", "--out", "o"], "smallcnn"),
    Case("train-device-absent", lambda t: ["train", "--device", "cuda:99", "--out", "o"], "not available"),
    Case("train-model-arg-unclosed", lambda t: ["train", "--model-arg", "width=[4", "--out", "o"], "--model-arg"),
    Case("train-model-arg-no-value", lambda t: ["train", "--model-arg", "width", "--out", "o"], "KEY=VALUE"),
    Case("layers-model-arg-unclosed", lambda t: ["layers", "--model-arg", "width=[4"], "--model-arg"),
    # epsilons and names
    Case("eps-inf", lambda t: ["evaluate", "--eps", "inf", "--out", "o"], "finite"),
    Case("eps-nan", lambda t: ["evaluate", "--eps", "nan", "--out", "o"], "finite"),
    Case("eps-huge", lambda t: ["evaluate", "--eps", "1e9", "--out", "o"], "above 1"),
    Case("eps-negative", lambda t: ["evaluate", "--eps", "-0.1", "--out", "o"], "--eps must be positive"),
    Case("eps-zero", lambda t: ["evaluate", "--eps", "0", "--out", "o"], "--eps must be positive"),
    Case("eps-l2-negative", lambda t: ["evaluate", "--eps-l2", "-1", "--out", "o"], "--eps-l2 must be positive"),
    Case("eps-negative-text", lambda t: ["evaluate", "--eps", "-abc", "--out", "o"], "cannot read"),
    Case("eps-text", lambda t: ["evaluate", "--eps", "abc", "--out", "o"], "cannot read"),
    Case("eps-division-by-zero", lambda t: ["evaluate", "--eps", "1/0", "--out", "o"], "cannot read"),
    Case("eps-l2-inf", lambda t: ["evaluate", "--eps-l2", "inf", "--out", "o"], "--eps-l2"),
    Case("sensitivity-eps-above-one", lambda t: ["sensitivity", "--eps", "2", "--out", "o"], "above 1"),
    Case("evaluate-unknown-attack", lambda t: ["evaluate", "--attacks", "pgd-linff", "--out", "o"], "pgd-linf"),
    Case("evaluate-empty-attacks", lambda t: ["evaluate", "--attacks", ",", "--out", "o"], "--attacks"),
    Case("sensitivity-unknown-checkpoint", lambda t: ["sensitivity", "--compare", "nope", "--out", "o"], "nope"),
    Case("sensitivity-other-attack", lambda t: ["sensitivity", "--attack", "fgsm", "--out", "o"], "pgd-linf"),
    Case("run-unknown-model", lambda t: ["run", "--model", "no-such-model", "--out", "o"], "no-such-model"),
    Case(
        "checkpoint-weights-missing",
        lambda t: ["evaluate", "--model", "nosuch.safetensors", "--out", "o"],
        "weights file nosuch.safetensors does not exist",
    ),
    Case(
        "zoo-weights-missing",
        lambda t: ["evaluate", "--model", "smallcnn", "--weights", "nosuch.safetensors", "--out", "o"],
        "weights file nosuch.safetensors does not exist",
    ),
    Case("run-unknown-dataset", lambda t: ["run", "--data", "imagenet", "--out", "o"], "unknown dataset"),
    # data files
    Case("npz-empty-file", raw_npz_run(b""), "not an .npz archive"),
    Case("npz-random-bytes", raw_npz_run(os.urandom(300)), "not an .npz archive"),
    Case("npz-random-bytes-with-zip-magic", raw_npz_run(b"PK\x03\x04" + os.urandom(300)), "not an .npz archive"),
    Case("npz-single-npy", raw_npz_run(npy_bytes(x_ok)), "single .npy array"),
    Case("npz-bomb", npz_bomb_run(), "inflates 1027x (3.7 MiB -> 3.7 GiB); refusing a likely zip bomb"),
    Case("npz-bomb-over-limit", with_env(npz_bomb_run(), MAX_INPUT_ENV, "1G"), "(972800, 1, 64, 64)"),
    Case("npz-declares-huge-shape", raw_npz_run(zip_of(("x.npy", HUGE_HEADER), ("y.npy", Y_NPY))), "input limit"),
    Case("npz-truncated-member", raw_npz_run(zip_of(("x.npy", X_NPY[:-40]), ("y.npy", Y_NPY))), "truncated"),
    Case("npz-member-not-npy", raw_npz_run(zip_of(("x.npy", b"hello"), ("y.npy", Y_NPY))), "not a readable .npy"),
    Case("npz-bzip2-member", raw_npz_run(zip_of(("x.npy", X_NPY), ("y.npy", Y_NPY), method=12)), "compression method"),
    Case("npz-limit-env-malformed", with_env(npz_run(x=x_ok, y=y_ok), MAX_INPUT_ENV, "lots"), MAX_INPUT_ENV),
    Case("npz-over-env-limit", with_env(npz_run(x=x_ok, y=y_ok), MAX_INPUT_ENV, "1K"), "input limit of 1.0 KiB"),
    Case("npz-object-array", npz_run(x=np.array([{"a": 1}] * 20, dtype=object), y=y_ok), "object array"),
    Case("npz-missing-y", npz_run(x=x_ok), "'x' and 'y'"),
    Case("npz-nan", npz_run(x=np.full_like(x_ok, np.nan), y=y_ok), "NaN"),
    Case("npz-above-one", npz_run(x=x_ok * 300, y=y_ok), "[0, 1]"),
    Case("npz-float-labels", npz_run(x=x_ok, y=y_ok.astype(np.float32)), "integer labels"),
    Case("npz-two-dims", npz_run(x=x_ok.reshape(20, 64), y=y_ok), "shape"),
    Case("npz-count-mismatch", npz_run(x=x_ok, y=y_ok[:5]), "labels"),
    Case("npz-negative-label", npz_run(x=x_ok, y=y_ok - 5), "labels"),
    Case("npz-no-images", npz_run(x=x_ok[:0], y=y_ok[:0]), "no images"),
    Case("npz-complex", npz_run(x=x_ok.astype(np.complex64), y=y_ok), "uint8 or float"),
    Case("npz-huge-label", npz_run(x=x_ok, y=y_ok + 10**9), "labels"),
    Case("npz-test-other-shape", npz_run(x=x_ok, y=y_ok, x_test=x_ok[:, :, :4], y_test=y_ok), "x_test images are"),
    Case("npz-missing-file", lambda t: ["run", "--data", "npz", "--data-dir", "gone.npz", "--out", "o"], "not exist"),
    Case("image-bomb", folder_run({"a/bomb.png": png_header(20_000, 20_000)}), "too large"),
    Case("image-bomb-warning-size", folder_run({"a/bomb.png": png_header(10_000, 10_000)}), "too large"),
    Case("image-truncated", folder_run({"a/x.png": b"\x89PNG\r\n\x1a\nbroken"}), "cannot read image"),
    Case("image-no-classes", folder_run({"x.png": b""}), "no class sub-folders"),
    Case("cifar-label-10", cifar_run([10, 0]), "labels must lie"),
    Case("cifar-label-255", cifar_run([255, 1]), "labels must lie"),
    Case("cifar-code-pickle", cifar_run([0, 0], pickle.dumps(os.system)), "not a CIFAR-10"),
    Case("mnist-truncated-idx", idx_truncated, "truncated"),
    Case(
        "mnist-idx-declares-huge-shape",
        idx_files(b"\x00\x00\x08\x03" + struct.pack(">III", 4_000_000_000, 28, 28)),
        "over the input limit",
    ),
    Case(
        "mnist-idx-gzip-more-than-declared",
        idx_files(b"\x00\x00\x08\x03" + struct.pack(">III", 10, 28, 28) + bytes(50 * 2**20)),
        "found more",
    ),
    Case("cifar-tar-huge-member", cifar_tar([("cifar-10-batches-py/data_batch_1", 10**11, b"")]), "input limit"),
    Case(
        "cifar-repeated-reference",
        cifar_run([0, 0], pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [np.zeros(10**6)] * 2})),
        "'labels' must be a list of integers",
    ),
    # report
    Case("report-missing-dir", lambda t: ["report", "nowhere"], "not a run directory"),
    Case("report-a-file", with_file("r", ["report", "r"]), "not a run directory"),
    Case("report-results-list", report_of([1, 2]), "JSON object"),
    Case("report-results-invalid", report_of(b"{not json"), "cannot read"),
    Case("report-stages-list", report_of({"stages": [1]}), "JSON object"),
    Case("report-figure-without-file", report_of(stage(figures=[{"caption": "x"}])), "has no 'file'"),
    Case("report-absolute-figure", report_of(stage(figures=[{"file": "/etc/hostname"}])), "not inside"),
    Case("report-dotdot-table", report_of(stage(tables=[{"file": "../t.csv", "show": True}])), "not inside"),
    Case("report-symlinked-table", symlinked_table, "outside"),
    Case("report-symlinked-results", symlinked_results, "outside"),
    Case("report-figure-is-folder", report_of(stage(figures=[{"file": "figures"}])), "not a regular file"),
    Case("report-table-file-number", report_of(stage(tables=[{"file": 7}])), "must be a path"),
    Case("report-card-list", report_of({"stages": {}, "model_card": [1]}), "model_card"),
    Case("report-image-shape-number", report_of({"stages": {}, "dataset": {"image_shape": 3}}), "unexpected type"),
]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory (the current directory of the command)."""
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.delenv(MAX_INPUT_ENV, raising=False)  # restored after a case sets it
    yield d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, work: Path, cli) -> None:
    argv = case.setup(work)
    before = snapshot(work.parent)
    code, out, err = cli(argv)
    assert_one_line(code, err, case.code, case.needle)
    assert out == "", out
    assert snapshot(work.parent) == before  # nothing written, nothing removed
    assert not (work / "pwned").exists()


def test_unwritable_parent_is_refused_before_any_work(work: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == work / "ro" else real_access(p, m))
    before = snapshot(work)
    code, _, err = cli(["run", "--out", "ro/run"])
    assert_one_line(code, err, 2, "not writable")
    code, _, err = cli(["train", "--out", "ro/run", "--epochs", "1"])
    assert_one_line(code, err, 2, "not writable")
    assert snapshot(work) == before


# -- --overwrite and the marker ----------------------------------------------------------------
def test_user_files_survive_overwrite_and_run_directories_are_replaced(work: Path, cli, fmnist: object) -> None:
    with_user_folder([])(work)
    (work / "ov.yaml").write_text(OVERVIEW)
    before = snapshot(work / "thesis")
    code, _, err = cli(["run", "--config", "ov.yaml", "--out", "thesis", "--overwrite"])
    assert_one_line(code, err, 2, "not a robustdissect run directory")
    assert snapshot(work / "thesis") == before
    assert not (work / "thesis.partial").exists()

    # a directory robustdissect made is replaced, and holds the new run's marker afterwards
    code, _, err = cli(["run", "--config", "ov.yaml", "--out", "first"])
    assert code == 0, err
    first_id = json.loads((work / "first" / MARKER).read_text())["run_id"]
    assert not (work / "first" / LOCK).exists()
    (work / "first" / "stale.txt").write_text("from the first run")
    code, _, err = cli(["run", "--config", "ov.yaml", "--out", "first", "--overwrite"])
    assert code == 0, err
    assert json.loads((work / "first" / MARKER).read_text())["run_id"] != first_id
    assert not (work / "first" / "stale.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["first", "ov.yaml", "thesis"]


def test_files_follow_the_umask(work: Path, cli, fmnist: object) -> None:
    (work / "ov.yaml").write_text(OVERVIEW)
    old = os.umask(0o022)
    try:
        code, _, err = cli(["run", "--config", "ov.yaml", "--out", "r"])
    finally:
        os.umask(old)
    assert code == 0, err
    for rel in ("report.html", "results.json", "config.yaml", MARKER):
        assert (work / "r" / rel).stat().st_mode & 0o777 == 0o644, rel
    assert (work / "r").stat().st_mode & 0o777 == 0o755
    res = (work / "r" / "results.json").read_text()
    assert "NaN" not in res and "Infinity" not in res


# -- unexpected errors -------------------------------------------------------------------------
@pytest.fixture
def exploding_stage() -> Iterator[str]:
    """A registered stage that fails with an error no validation foresaw."""
    from robustdissect.pipeline import STAGES

    name = "exploding-test-stage"

    def stage_fn(ctx: object, options: dict[str, object]) -> dict[str, object]:
        raise ZeroDivisionError("the stage divided by zero")

    STAGES.register(name, "fails on purpose")(stage_fn)
    yield name
    STAGES._entries.pop(name)


def test_unexpected_error_one_line_log_in_partial_and_resumable(
    work: Path, cli, exploding_stage: str, fmnist: object
) -> None:
    (work / "boom.yaml").write_text(f"stages: [{exploding_stage}]\nn: 20\n")
    argv = ["run", "--config", "boom.yaml", "--out", "r"]
    code, _, err = cli(argv)
    line = assert_one_line(code, err, 1, "ZeroDivisionError: the stage divided by zero")
    assert "details in r.partial/error.log" in line
    log = (work / "r.partial" / "error.log").read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log
    assert (work / "r.partial" / MARKER).is_file() and not (work / "r").exists()

    # the partial directory is kept: a plain rerun is told how to go on, --verbose shows the trace
    code, _, err = cli(argv)
    assert_one_line(code, err, 2, "pass --resume to continue it or --overwrite")
    code, _, err = cli([*argv, "--resume", "--verbose"])
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("robustdissect: unexpected")
    assert log in (work / "r.partial" / "error.log").read_text()  # appended, not replaced
    code, _, err = cli(["run", "--config", "none.yaml", "--out", "r", "--overwrite"])
    assert_one_line(code, err, 2, "does not exist")
    assert (work / "r.partial" / "error.log").is_file()


# -- faults inside a run: user code that exits, a full disk, a folder that is not writable ------
@pytest.fixture
def faulty_stage() -> Iterator[Callable[[Callable[[Any], None]], str]]:
    """Registers stages that call `fault(ctx)` (raise, exit, write) and otherwise finish."""
    from robustdissect.pipeline import STAGES, section

    names: list[str] = []

    def register(fault: Callable[[Any], None]) -> str:
        name = f"faulty-test-stage-{len(names)}"

        def stage_fn(ctx: Any, options: dict[str, object]) -> dict[str, object]:
            fault(ctx)
            return section("Faulty", text="finished")

        STAGES.register(name, "fails on purpose")(stage_fn)
        names.append(name)
        return name

    yield register
    for name in names:
        STAGES._entries.pop(name)


USER_MODELS = """
import sys
from torch import nn

class Net(nn.Module):
    def __init__(self, exit_in_forward: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.exit_in_forward = exit_in_forward

    def forward(self, x):
        if self.exit_in_forward:
            sys.exit(0)
        return self.fc(x.flatten(1))

def make():
    sys.exit(0)

def make_fail():
    raise SystemExit("giving up")

def exits_in_forward():
    return Net(exit_in_forward=True)
"""


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("f.py:make", "the model factory f.py:make exited with status 0"),
        ("f.py:make_fail", "the model factory f.py:make_fail exited with status 'giving up'"),
        ("f.py:exits_in_forward", "the model's forward pass exited with status 0"),
        ("g.py:make", "importing g.py exited with status 3"),
    ],
)
def test_sys_exit_in_user_model_code_is_an_error_not_a_success(work: Path, cli, spec: str, needle: str) -> None:
    (work / "f.py").write_text(USER_MODELS)
    (work / "g.py").write_text("import sys\nsys.exit(3)\n")
    before = snapshot(work)
    code, out, err = cli(["evaluate", "--model", spec, "--n", "20", "--out", "o"])
    assert_one_line(code, err, 2, needle)
    assert out == "" and snapshot(work) == before


def _exit_zero(ctx: Any) -> None:
    sys.exit(0)


def test_sys_exit_inside_a_run_keeps_finished_stages_and_resumes(
    work: Path, cli, faulty_stage: Callable[[Callable[[Any], None]], str], fmnist: object
) -> None:
    armed = [True]
    name = faulty_stage(lambda ctx: _exit_zero(ctx) if armed[0] else None)
    # nothing finished yet: one line, exit 2, nothing left behind
    (work / "alone.yaml").write_text(f"stages: [{name}]\nn: 20\n")
    before = snapshot(work)
    code, out, err = cli(["run", "--config", "alone.yaml", "--out", "a"])
    line = assert_one_line(code, err, 2, "exited with status 0 (SystemExit at ")
    assert "test_hostile_inputs.py:" in line and out == ""
    assert snapshot(work) == before
    # after a finished stage: exit 1, the finished stage kept, and --resume completes the run
    (work / "two.yaml").write_text(f"stages: [overview, {name}]\nn: 20\n")
    code, out, err = cli(["run", "--config", "two.yaml", "--out", "r"])
    line = assert_one_line(code, err, 1, "exited with status 0")
    assert "finished work is kept in r.partial" in line and "--resume" in line
    assert json.loads((work / "r.partial" / "results.json").read_text())["stages"].keys() == {"overview"}
    armed[0] = False
    code, out, err = cli(["run", "--config", "two.yaml", "--out", "r", "--resume"])
    assert code == 0, err
    assert (work / "r" / "report.html").is_file() and not (work / "r.partial").exists()


def _no_space(ctx: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(ctx.run.path / "evidence" / "x.safetensors"))


def _safetensors_no_space(ctx: Any) -> None:
    from safetensors import SafetensorError

    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _write_on_full_disk(ctx: Any) -> None:
    """A real write through the run directory's atomic writer, on a disk that is full."""
    import tempfile

    real = tempfile.mkstemp

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    tempfile.mkstemp = full  # type: ignore[assignment]
    try:
        ctx.run.write_table("x", [{"a": 1}])
    finally:
        tempfile.mkstemp = real  # type: ignore[assignment]


@pytest.mark.parametrize("fault", [_no_space, _safetensors_no_space, _write_on_full_disk])
def test_a_full_disk_says_so_and_how_to_resume(
    work: Path, cli, faulty_stage: Callable[[Callable[[Any], None]], str], fmnist: object, fault: Any
) -> None:
    name = faulty_stage(fault)
    (work / "alone.yaml").write_text(f"stages: [{name}]\nn: 20\n")
    before = snapshot(work)
    code, _, err = cli(["run", "--config", "alone.yaml", "--out", "a"])
    line = assert_one_line(code, err, 2, "the disk is full (no space left on device")
    assert line.endswith("; free some space")
    assert snapshot(work) == before  # nothing was computed: nothing is left
    (work / "two.yaml").write_text(f"stages: [overview, {name}]\nn: 20\n")
    code, _, err = cli(["run", "--config", "two.yaml", "--out", "r"])
    line = assert_one_line(code, err, 1, "the disk is full")
    assert line.endswith(
        "; finished work is kept in r.partial; free some space, then rerun the same command with --resume to continue"
    )
    assert json.loads((work / "r.partial" / "results.json").read_text())["stages"].keys() == {"overview"}
    assert not (work / "r.partial" / "error.log").exists()  # not an unexpected error


def test_report_on_a_run_directory_that_is_not_writable(work: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run = fake_run(work, {"schema_version": 1, "stages": {}})
    before = snapshot(work)
    if os.geteuid() == 0:  # root writes anywhere: the operating system's refusal is simulated
        import tempfile

        real_mkstemp, real_access = tempfile.mkstemp, os.access

        def mkstemp(*args: Any, **kwargs: Any) -> Any:
            if Path(kwargs.get("dir", "")) == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(run / ".report.html.x.tmp"))
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == run and m & os.W_OK else real_access(p, m))
    else:
        run.chmod(0o555)
    try:
        code, _, err = cli(["report", str(run)])
    finally:
        run.chmod(0o755)
    assert_one_line(code, err, 2, f"cannot write {run}/report.html: {run} is not writable")
    assert snapshot(work) == before


def test_an_interrupt_inside_a_stage_is_reported_once(
    work: Path, cli, faulty_stage: Callable[[Callable[[Any], None]], str], fmnist: object
) -> None:
    def interrupt(ctx: Any) -> None:
        raise KeyboardInterrupt

    name = faulty_stage(interrupt)
    (work / "two.yaml").write_text(f"stages: [overview, {name}]\nn: 20\n")
    code, _, err = cli(["run", "--config", "two.yaml", "--out", "r"])
    assert code == 130 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "interrupted" in ln or "resume" in ln] == [
        "robustdissect: interrupted; finished stages are kept in r.partial; "
        "rerun the same command with --resume to continue"
    ], err


@pytest.mark.parametrize(
    ("image", "needle"),
    [(png_header(20_000, 20_000), "too large to decode safely"), (png_header(10_000, 10_000), "too large"),
     (b"\x89PNG\r\n\x1a\nbroken", "cannot read image")],
)  # fmt: skip
def test_broden_images_are_decoded_safely(tmp_path: Path, image: bytes, needle: str) -> None:
    from robustdissect.data.concepts import load_broden

    root = tmp_path / "broden"
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text("number,name,category\n0,-,-\n1,red-c,color(1)\n")
    (root / "index.csv").write_text("image,split,color\nbomb.png,train,\n")
    (root / "images" / "bomb.png").write_bytes(image)
    with pytest.raises(UserError, match=needle) as caught:
        load_broden(root, (3, 8, 8))
    assert "\n" not in str(caught.value)


BOMB_PROBE = """
import resource, sys, time
from robustdissect.data import load_dataset
from robustdissect.errors import UserError

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    load_dataset("npz", sys.argv[1])
    print("loaded")
except UserError as e:
    print("refused:", e)
print(time.perf_counter() - t0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_npz_bomb_is_refused_from_its_headers_fast_and_with_flat_memory(tmp_path: Path) -> None:
    """3.7 MiB on disk, 3.7 GiB inflated: refused before inflating (loading it would take tens of
    seconds and the whole 3.7 GiB); the peak memory of the process barely moves."""
    bomb = write_npz_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 8 * 2**20
    for limit in (None, "1G"):  # the ratio check, then the declared shape against the limit
        env = {k: v for k, v in _env().items() if k != MAX_INPUT_ENV}
        if limit:
            env[MAX_INPUT_ENV] = limit
        done = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(bomb)], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        verdict, seconds, grown = done.stdout.strip().splitlines()
        assert verdict.startswith("refused:") and ("zip bomb" in verdict or "input limit" in verdict), verdict
        assert "allow_pickle" not in verdict
        assert float(seconds) < 5.0  # inflating 3.7 GiB alone takes longer than this
        assert int(grown) < 64 * 2**20, f"peak memory grew by {int(grown) / 2**20:.0f} MiB"


# -- training ----------------------------------------------------------------------------------
def test_non_finite_loss_stops_training_and_keeps_the_last_good_epoch(tmp_path: Path, fmnist: object) -> None:
    import torch

    from robustdissect.training import TrainConfig, Vanilla, train

    class NanFromEpoch2(Vanilla):
        epoch = 0

        def on_epoch_start(self, model: torch.nn.Module, epoch: int) -> None:
            self.epoch = epoch

        def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
            step = super().__call__(model, x, y)
            return dataclasses.replace(step, loss=step.loss * float("nan")) if self.epoch == 1 else step

    cfg = TrainConfig(model_args={"width": 4}, n=64, epochs=2, batch_size=32, seed=0)
    with pytest.raises(UserError, match=r"loss became nan in epoch 2 .*epoch 1\) is kept"):
        train(cfg, tmp_path / "t", objective=NanFromEpoch2(), data=fmnist)  # type: ignore[arg-type]
    saved = torch.load(tmp_path / "t" / "state.pt", weights_only=True)
    assert saved["epoch"] == 1 and not (tmp_path / "t" / "model.safetensors").exists()

    with pytest.raises(UserError, match="loss became"):  # no epoch finished: nothing is left
        train(TrainConfig(model_args={"width": 4}, n=64, epochs=1, lr=1e30, batch_size=16), tmp_path / "u", data=fmnist)  # type: ignore[arg-type]
    assert not (tmp_path / "u").exists()


def test_train_resume_reads_its_own_configuration(work: Path, cli) -> None:
    argv = ["train", "--model-arg", "width=4", "--n", "64", "--epochs", "2", "--batch-size", "32", "--out", "t"]
    (work / "t").mkdir()
    import torch

    from robustdissect.training import TrainConfig
    from robustdissect.training.loop import _save_state

    cfg = TrainConfig(model_args={"width": 4}, n=64, epochs=2, batch_size=32)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _save_state(work / "t" / "state.pt", model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 0, [], cfg)
    code, _, err = cli([*argv[:-2], "--epochs", "3", "--resume", "t"])
    assert_one_line(code, err, 2, "different configuration (epochs: 2 there, 3 now)")
    code, _, err = cli(["train", "--resume", "t", "--config", "none.yaml"])
    assert_one_line(code, err, 2, "does not exist")


def test_interrupted_train_says_how_to_resume_and_resumes_without_its_config(
    work: Path, cli, monkeypatch: pytest.MonkeyPatch, fmnist: object
) -> None:
    from robustdissect.training import Vanilla

    def stop_at_epoch_2(self: Vanilla, model: object, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    argv = ["train", "--model-arg", "width=4", "--n", "64", "--epochs", "2", "--batch-size", "32", "--out", "t"]
    with monkeypatch.context() as m:
        m.setattr(Vanilla, "on_epoch_start", stop_at_epoch_2)
        code, out, err = cli(argv)
    assert code == 130 and "Traceback" not in err and out == ""
    assert error_lines(err) == [  # (above it, only the progress bar of epoch 1)
        "robustdissect: interrupted; the last finished epoch is kept in t; "
        "continue with: robustdissect train --resume t"
    ], err
    assert (work / "t" / "state.pt").is_file() and not (work / "t" / "model.safetensors").exists()
    code, out, err = cli(["train", "--resume", "t"])  # the README's form: no --config needed
    assert code == 0, err
    assert "wrote t/model.safetensors" in out
    assert not (work / "t" / LOCK).exists()


# -- processes: the lock, Ctrl-C and kill -9 ---------------------------------------------------
GATED = """
import sys, time
from pathlib import Path
from robustdissect import runs

ready, gate = Path(sys.argv[1]), Path(sys.argv[2])
create = runs.RunDir.create.__func__

def gated(cls, *args, **kwargs):
    run = create(cls, *args, **kwargs)
    ready.touch()
    while not gate.exists():
        time.sleep(0.05)
    return run

runs.RunDir.create = classmethod(gated)
from robustdissect.cli import main
main(sys.argv[3:])
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def gated_run(work: Path, args: list[str]) -> tuple[subprocess.Popen[str], Path, Path]:
    """Start `robustdissect ARGS` in a process that stops right after creating its run directory
    until `gate` exists; returns (process, ready, gate) once it stopped there."""
    script = work / "gated.py"
    script.write_text(GATED)
    ready, gate = work / "ready", work / "gate"
    ready.unlink(missing_ok=True)
    gate.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ready), str(gate), *args],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the gated run never started"
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, ready, gate


def _default_sigint() -> None:
    """In the child, before it starts: Ctrl-C back to its default action. A suite started in the
    background (`nohup bash scripts/test.sh &`) inherits SIGINT as ignored, and so would every
    process it starts; the command line keeps an inherited 'ignore', as background jobs expect."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def robustdissect(work: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], cwd=work, env=_env(), capture_output=True, text=True, timeout=300)


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("robustdissect:")]


@pytest.mark.slow
def test_two_runs_on_one_out_one_completes_one_is_refused(work: Path) -> None:
    (work / "ov.yaml").write_text(OVERVIEW)
    args = ["run", "--config", "ov.yaml", "--out", "r"]
    first, _, gate = gated_run(work, args)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = robustdissect(work, args + extra)
            assert second.returncode == 2, second.stderr
            assert "Traceback" not in second.stderr
            assert error_lines(second.stderr) == [
                f"robustdissect: error: r is being written by process {first.pid}; "
                "wait for it to finish or choose another --out"
            ], second.stderr
        gate.touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert "wrote r/report.html" in out
    assert (work / "r" / "results.json").is_file() and (work / "r" / "config.yaml").is_file()
    assert not (work / "r.partial").exists()
    assert json.loads((work / "r" / "results.json").read_text())["stages"].keys() == {"overview"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_exits_130_with_a_resume_hint_and_resume_completes(work: Path, sig: int, code: int, word: str) -> None:
    """Ctrl-C (SIGINT) and SIGTERM: one line that says how to resume, exit 130 / 143."""
    (work / "ov.yaml").write_text(OVERVIEW)
    args = ["run", "--config", "ov.yaml", "--out", "r"]
    proc, _, _ = gated_run(work, args)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"robustdissect: {word}; finished stages are kept in r.partial; "
        "rerun the same command with --resume to continue"
    ], err
    assert (work / "r.partial" / MARKER).is_file()
    done = robustdissect(work, [*args, "--resume"])
    assert done.returncode == 0, done.stderr
    assert (work / "r" / "report.html").is_file() and not (work / "r.partial").exists()


@pytest.mark.slow
def test_the_interrupt_test_passes_in_a_suite_started_in_the_background(tmp_path: Path) -> None:
    """`nohup bash scripts/test.sh &` runs the suite with SIGINT ignored; the Ctrl-C test must
    still pass there and leave no process behind."""

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    test = f"{Path(__file__)}::test_ctrl_c_exits_130_with_a_resume_hint_and_resume_completes"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, preexec_fn=ignore_sigint,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout[-3000:]
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left running: {left.stdout}"


@pytest.mark.slow
def test_kill_9_releases_the_lock_and_the_run_resumes(work: Path) -> None:
    (work / "ov.yaml").write_text(OVERVIEW)
    args = ["run", "--config", "ov.yaml", "--out", "r"]
    proc, _, _ = gated_run(work, args)
    proc.kill()
    proc.communicate(timeout=60)
    assert (work / "r.partial" / LOCK).is_file()  # the file stays; the kernel dropped the lock
    again = robustdissect(work, args)
    assert again.returncode == 2 and error_lines(again.stderr) == [
        "robustdissect: error: an interrupted run is in r.partial; "
        "pass --resume to continue it or --overwrite to start over"
    ], again.stderr
    done = robustdissect(work, [*args, "--resume"])
    assert done.returncode == 0, done.stderr
    assert (work / "r" / "report.html").is_file() and not (work / "r.partial").exists()
    assert not (work / "r" / LOCK).exists()


def test_subprocess_parse_and_user_errors_are_one_line(work: Path) -> None:
    for args, code, needle in (
        (["run", "--n", "ten"], 2, "'--n'"),
        (["run", "--out", "."], 2, "new run directory"),
        (["report", "/"], 2, "not a run directory"),
    ):
        done = robustdissect(work, args)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], done.stderr
    assert list(work.iterdir()) == []


# -- fuzzing the file formats ------------------------------------------------------------------
FUZZ = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_counter = iter(range(10**9))

dtypes = st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "complex64", "float16", "int8"])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, max_side=12)))


@FUZZ
@given(
    arrs=st.dictionaries(st.sampled_from(["x", "y", "x_test", "y_test", "z"]), arrays, max_size=4),
    junk=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_fuzz_npz_gives_a_dataset_or_a_user_error(
    tmp_path: Path, arrs: dict[str, np.ndarray], junk: bytes | None
) -> None:
    from robustdissect.data import Dataset, load_dataset

    path = tmp_path / f"f{next(_counter)}.npz"
    if junk is not None:
        path.write_bytes(junk)
    else:
        write_npz(path, **arrs)
    try:
        ds = load_dataset("npz", str(path))
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(ds, Dataset) and len(ds.test) > 0 and ds.num_classes >= 1


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
config_keys = st.sampled_from(
    ["model", "weights", "model_args", "dataset", "data_dir", "split", "n", "batch_size", "seed", "device", "quick",
     "stages", "epochs", "lr", "momentum", "objective", "schedule", "augment", "amp", "unknown"]
)  # fmt: skip


@FUZZ
@given(doc=st.dictionaries(config_keys, yaml_values, max_size=4) | yaml_values, raw=st.one_of(st.none(), st.text()))
def test_fuzz_yaml_gives_a_config_or_a_user_error(tmp_path: Path, doc: object, raw: str | None) -> None:
    from robustdissect.config import RunConfig, load_config, load_yaml
    from robustdissect.training import TrainConfig
    from robustdissect.training.loop import train_config_from_dict

    path = tmp_path / f"c{next(_counter)}.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(doc))
    try:
        assert isinstance(load_config(path), RunConfig)
    except UserError as e:
        assert "\n" not in str(e)
    try:
        assert isinstance(train_config_from_dict(load_yaml(path), str(path)), TrainConfig)
    except UserError as e:
        assert "\n" not in str(e)


def test_max_input_bytes_option(tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-input-bytes is the command-line form of ROBUSTDISSECT_MAX_INPUT_BYTES."""
    monkeypatch.delenv(MAX_INPUT_ENV, raising=False)
    bomb = write_npz_bomb(tmp_path / "bomb.npz")
    out = tmp_path / "out"
    code, _o, err = cli(["evaluate", "--data", "npz", "--data-dir", str(bomb), "--max-input-bytes", "1G",
                         "--out", str(out)])  # fmt: skip
    assert code == 2 and "(972800, 1, 64, 64)" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    monkeypatch.delenv(MAX_INPUT_ENV, raising=False)
    code, _o, err = cli(["evaluate", "--max-input-bytes", "lots", "--out", str(out)])
    assert code == 2 and "--max-input-bytes 'lots'" in err and not out.exists()
