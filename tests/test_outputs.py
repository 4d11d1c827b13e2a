"""What predict writes, whatever the inputs are called: one row and one set of pictures per input, nothing
overwritten, never into a folder it reads; undecodable names kept losslessly; a full disk, an --out that
cannot be created and a model another user cannot read each end in one line (issue 25).

The property test drives the writing layer the CLI uses (real files, `expand_inputs`, `output_names`,
`PredictionsCsv`, `save_pictures`) with stand-in predictions, so it runs hundreds of cases in seconds; one
end-to-end `predict` with the tiny model covers the same names through the real command.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from anomalyvfm.cli import main as cli
from anomalyvfm.cli.main import expand_inputs, main
from anomalyvfm.maps.render import save_pictures
from anomalyvfm.outputs import (MAX_NAME_BYTES, PREDICTIONS_CSV, TEXT_ERRORS, PredictionsCsv,
                                output_names, picture_files, prepare_output_folder)
from anomalyvfm.prediction import Prediction

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY_PNG = (lambda b: (Image.fromarray(np.full((2, 3, 3), 90, np.uint8)).save(b, format="PNG"), b.getvalue())[1])(
    io.BytesIO())


def read_csv(path: Path) -> list[dict[str, str]]:
    """predictions.csv as the docs say to read it: UTF-8 with surrogateescape (lossless file names)."""
    with open(path, encoding="utf-8", errors=TEXT_ERRORS, newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(root: Path) -> dict[bytes, bytes]:
    """Every file under `root` (as raw name bytes) with its content."""
    return {os.fsencode(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- the property: names ------------------------------------------------------------------------------
def _valid_name(name: bytes) -> bool:
    return name not in (b".", b"..") and b"/" not in name and b"\0" not in name


_byte_names = st.binary(min_size=1, max_size=12).filter(_valid_name).map(os.fsdecode)  # often not UTF-8
_text_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12)
_odd_names = st.sampled_from([" ", "a b", "-x", "--help", "-", "new\nline", "tab\there", ".hidden", "x", "X", "_x",
                              "é" * 80, "a" * 200, "x_mask", "x_overlay", "predictions", "x~2", "x_png"])
NAMES = st.one_of(_byte_names, _text_names, _odd_names).filter(lambda n: _valid_name(os.fsencode(n)))
EXTENSIONS = st.sampled_from([".png", ".PNG", ".jpg", ".jpeg", ".bmp", ".tif"])


@st.composite
def input_trees(draw) -> tuple[list[str], list[tuple[int, str]]]:
    """Folders and (folder index, file name) pairs with deliberate collisions: a small pool of stems reused
    across folders and extensions, and stems that look like another input's qualified output name."""
    folders = draw(st.lists(NAMES, min_size=1, max_size=3, unique_by=lambda n: os.fsencode(n)))
    pool = draw(st.lists(NAMES, min_size=1, max_size=4))
    derived = [f"{folder}_{stem}" for folder in folders for stem in pool] + [f"{s}_png" for s in pool] + \
              [s.upper() for s in pool]
    stems = st.sampled_from(pool + derived)
    files = draw(st.lists(st.tuples(st.integers(0, len(folders) - 1), stems, EXTENSIONS), min_size=1, max_size=7))
    named = [(i, stem + ext) for i, stem, ext in files if len(os.fsencode(stem + ext)) <= 255]
    return folders, named or [(0, "x.png")]


def _fake_prediction(path: Path) -> Prediction:
    return Prediction(source=str(path), score=0.5, is_anomalous=True, anomaly_map=np.zeros((2, 3), np.float32),
                      mask=np.eye(2, 3, dtype=bool))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=input_trees())
def test_every_input_gets_one_row_and_its_own_pictures_whatever_it_is_called(tree):
    folders, files = tree
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = root / "in"
        for i, name in files:
            (inputs / f"{i}{folders[i]}").mkdir(parents=True, exist_ok=True)
            (inputs / f"{i}{folders[i]}" / name).write_bytes(TINY_PNG)
        before = snapshot(inputs)
        paths = expand_inputs([str(inputs / f"{i}{folders[i]}") for i in sorted({i for i, _ in files})])
        out = prepare_output_folder(root / "out", paths)
        names = output_names(paths)

        written = [file for name in names for file in picture_files(name)]
        assert len(set(n.casefold() for n in names)) == len(paths)  # unique, even on a case-insensitive share
        assert all(_valid_name(os.fsencode(f)) and len(os.fsencode(f".{f}.partial")) <= 255 for f in written)
        assert all(len(os.fsencode(n)) <= MAX_NAME_BYTES and not n.startswith(".") for n in names)
        with PredictionsCsv(out / PREDICTIONS_CSV) as table:
            for name, path in zip(names, paths):
                pred = _fake_prediction(path)
                table.add(pred.source, pred.score, pred.is_anomalous, pred.error)
                save_pictures(out, name, pred, (0.0, 1.0))

        assert [r["path"] for r in read_csv(out / PREDICTIONS_CSV)] == [str(p) for p in paths]  # lossless
        assert sorted(os.listdir(out)) == sorted([PREDICTIONS_CSV, *written])  # nothing overwritten, no leftovers
        assert snapshot(inputs) == before  # the inputs untouched


def test_the_issue_examples_and_taken_names():
    """Inputs `a/x.png`, `a/x.jpg`, `d/00000_a_x.png` gave three rows but two masks; a resumed Ray run must not
    reuse the names of pictures already in its --out."""
    names = output_names([Path("a/x.png"), Path("a/x.jpg"), Path("d/00000_a_x.png")])
    assert len(set(names)) == 3
    assert output_names([Path("a/x.png"), Path("b/y.png")], taken=["x", "A_X"]) == ["a_x_png", "y"]
    assert output_names([Path("x/" + "é" * 200 + ".png")])[0] == "é" * (MAX_NAME_BYTES // 2)


def test_the_ray_engine_names_and_writes_with_the_same_functions():
    """Ray actors write the pictures themselves; the names come from the driver's `output_names`."""
    from anomalyvfm.distributed import predict as ray_predict
    from anomalyvfm.distributed import results

    assert ray_predict.output_names is output_names and ray_predict.prepare_output_folder is prepare_output_folder
    assert results.PredictionsCsv is PredictionsCsv
    assert "save_pictures(self.pictures, name," in Path(ray_predict.__file__).read_text()


# -- end to end ----------------------------------------------------------------------------------------
NASTY = [b"\xff\xfe name.png", b"-x.png", b"a b.png", b"new\nline.png", b"x.png", b"x.jpg", b"X.png", b"x_mask.png"]


def test_predict_writes_nasty_names_losslessly_and_never_overwrites(fitted_model, data_root, tmp_path, capsys):
    image = (data_root / "demo" / "test_public" / "bad" / "000_regular.png").read_bytes()
    a, d = tmp_path / "a", tmp_path / "d"
    for folder, names in ((a, NASTY), (d, [b"00000_a_x.png", b"a_x.png"])):
        folder.mkdir()
        for name in names:
            (folder / os.fsdecode(name)).write_bytes(image)
    before = snapshot(tmp_path)
    assert main(["predict", "--model", str(fitted_model), str(a), str(d), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err

    rows = read_csv(tmp_path / "out" / PREDICTIONS_CSV)
    expected = expand_inputs([str(a), str(d)])
    assert [r["path"] for r in rows] == [str(p) for p in expected] and all(r["score"] for r in rows)
    assert os.fsencode(str(a)) + b"/\xff\xfe name.png" in (tmp_path / "out" / PREDICTIONS_CSV).read_bytes()
    pictures = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != PREDICTIONS_CSV)
    assert len(pictures) == 2 * len(expected)
    assert sorted(pictures) == sorted(f for n in output_names(expected) for f in picture_files(n))
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(b"out/")} == before


# -- the output folder ---------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    def refuse(args):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize("out, fragment", [
    ("{images}", "--out is"),  # the input folder itself: the user's b_mask.png would be replaced
    ("{images}/predictions", "--out is inside"),  # the next run would score this run's pictures
    ("{images}/../images/./", "--out is"),
    ("{link}", "--out is"),  # a symbolic link to the input folder
    ("{model}/out", "--out is inside"),  # the model is read too
])
def test_out_in_a_folder_that_is_read_is_refused_before_work(out, fragment, fitted_model, tmp_path, capsys,
                                                             no_model_load):
    images = tmp_path / "images"
    images.mkdir()
    (images / "b.png").write_bytes(TINY_PNG)
    (images / "b_mask.png").write_bytes(b"the user's own mask")
    (tmp_path / "link").symlink_to(images)
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    before = snapshot(tmp_path)
    target = out.format(images=images, link=tmp_path / "link", model=model)
    assert main(["predict", "--model", str(model), str(images / "b.png"), "--out", target]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "reads from" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before  # nothing created, nothing replaced


@pytest.mark.parametrize("out", ["/proc/anomalyvfm-test/out", "{file}/sub"])
def test_out_that_cannot_be_created_is_one_line_before_the_model_loads(out, fitted_model, tmp_path, capsys,
                                                                      no_model_load):
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(TINY_PNG)
    target = out.format(file=tmp_path / "file")
    assert main(["predict", "--model", str(fitted_model), str(tmp_path / "in"), "--out", target]) == 2
    err = capsys.readouterr().err
    assert f"{target}: cannot create the output folder" in err and len(err.strip().splitlines()) == 1, err


# -- a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 KiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_out_is_one_line_before_the_model_loads(fitted_model, tmp_path, small_tmpfs, capsys,
                                                            no_model_load):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(TINY_PNG)
    assert main(["predict", "--model", str(fitted_model), str(tmp_path / "in"), "--out", str(small_tmpfs)]) == 2
    err = capsys.readouterr().err
    assert f"{small_tmpfs}: cannot create the output folder or write in it (Read-only file system)" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_full_disk_while_writing_predictions_csv_is_one_line(fitted_model, data_root, tmp_path, small_tmpfs,
                                                                capsys):
    images = tmp_path / "images"
    images.mkdir()
    source = data_root / "demo" / "test_public" / "bad" / "000_regular.png"
    for i in range(24):  # 24 rows of ~220 bytes: more than the 4 KiB the CSV can have
        (images / f"{i:02d}_{'long-name-' * 19}.png").symlink_to(source)
    out = small_tmpfs / "out"
    assert main(["predict", "--model", str(fitted_model), str(images), "--out", str(out), "--no-images"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "anomalyvfm" in line]  # the rest is the progress bar
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("anomalyvfm: error: "), err
    assert f"{out / PREDICTIONS_CSV}: cannot write (No space left on device)" in err
    written = int(err.split("the first ")[1].split(" rows")[0])
    rows = read_csv(out / PREDICTIONS_CSV)
    assert 0 < written == len(rows) < 24 and all(r["score"] for r in rows)  # whole rows only, as many as it says
    assert (out / PREDICTIONS_CSV).read_bytes().endswith(b"\r\n")


# -- a model fitted by one user, loaded by another --------------------------------------------------------
def _as_nobody(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """Run the CLI as uid/gid 65534 (nobody): the interpreter is bind-mounted where nobody can reach it
    (it may live under root's private home), in a private mount namespace."""
    prefix = Path(sys.base_prefix)
    executable = Path(sys.executable).resolve()
    mounted = tmp / "python"
    mounted.mkdir(exist_ok=True)
    python = mounted / executable.relative_to(prefix.resolve())
    script = (f"mount --bind {prefix} {mounted} && exec setpriv --reuid=65534 --regid=65534 --clear-groups "
              f"env HOME={tmp} LD_LIBRARY_PATH={mounted / 'lib'} PYTHONPATH={SRC} {python} -m anomalyvfm.cli.main "
              + " ".join(f"'{a}'" for a in argv))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_a_model_fitted_by_root_under_umask_022_is_readable_by_another_user(backbone_dir, data_root, tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs root, setpriv and unshare to run the CLI as another user")
    if sys.prefix != sys.base_prefix:
        pytest.skip("runs the base interpreter as another user; not inside a virtual environment")
    shared = Path(tempfile.mkdtemp(prefix="anomalyvfm-shared-"))  # pytest's tmp_path is private to root
    try:
        shared.chmod(0o755)
        previous = os.umask(0o022)
        try:
            assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                         "--image-size", "112", "--max-train-images", "4", "--out", str(shared / "model")]) == 0
        finally:
            os.umask(previous)
        files = [shared / "model", *(shared / "model").rglob("*")]
        assert {p.relative_to(shared).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == \
               {p.relative_to(shared).as_posix(): "0o755" if p.is_dir() else "0o644" for p in files}
        (shared / "in").mkdir(mode=0o755)
        shutil.copy(data_root / "demo" / "test_public" / "bad" / "000_regular.png", shared / "in" / "part.png")
        (shared / "in" / "part.png").chmod(0o644)
        (shared / "out").mkdir()
        (shared / "out").chmod(0o777)
        home = shared / "home"
        home.mkdir()
        home.chmod(0o777)

        probe = subprocess.run(["unshare", "-m", "mount", "--bind", sys.base_prefix, str(home)], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot bind-mount the interpreter for another user: {probe.stderr.strip()}")
        run = _as_nobody(["predict", "--model", str(shared / "model"), str(shared / "in" / "part.png"), "--out",
                          str(shared / "out")], home)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert len(read_csv(shared / "out" / PREDICTIONS_CSV)) == 1

        (shared / "model" / "head.safetensors").chmod(0o600)  # a file another user really cannot read
        run = _as_nobody(["predict", "--model", str(shared / "model"), str(shared / "in" / "part.png"), "--out",
                          str(shared / "out")], home)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "head.safetensors: cannot read (Permission denied)" in run.stderr
    finally:
        shutil.rmtree(shared)
