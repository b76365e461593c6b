"""Inference never loses data: both bundles' ``inference.json`` through the users' entry point.

The rule: no user file is ever written over. Outputs keep the input's sub-folder below ``--input``
(same-named volumes of different folders both get written); an output that would land on an input,
two inputs that would share an output (``x.tif`` next to ``x.tiff``), and an output that exists
already (unless ``--overwrite True``) are refused with one line on stderr and a non-zero exit,
before the first volume is processed. Every case checks the sha256 of every file that existed
before the run: all still there, unchanged (except the one file ``--overwrite True`` replaces).
Settings of the wrong type (``--save_probabilities false``) are refused in one line too, and a
folder of same-shaped numbered 2D slices is read as one volume.

The bundle runs share one forked runner (``tests.helpers.run_forked``: one process imports MONAI
once, each case is a forked ``python -m monai.bundle run``), started once for the cases selected;
``write_em``'s folder writes (temporary sibling folder, renamed at the end) are tested in-process
and in a forked child SIGKILLed half-way through.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from custom.io import DatasetError, find_em_files, read_em, write_em
from custom.synthetic import em_image, em_volume
from tests.helpers import (
    FT,
    INFER,
    PRE,
    assert_one_line,
    run_forked,
    tail,
    write_tiny_checkpoint,
)

# ------------------------------------------------------------------------------------------
# helpers


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksums(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_lost(before: dict[str, str], root: Path, replaced: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` is still under ``root`` with the same content (``replaced`` ones: changed)."""
    after = checksums(root)
    lost = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p] and p not in replaced]
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    for p in replaced:
        assert after.get(p) not in (None, before[p]), f"{p} was not replaced"


def _vol(path: Path, seed: int = 1, shape=(2, 64, 64)) -> Path:
    write_em(path, em_volume(shape, seed=seed)[0])
    return path


def _ft_root(tmp: Path) -> Path:
    write_tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
    return tmp / "root"


def _ft(tmp: Path, *extra) -> list:
    """Fine-tuning inference args: tiny checkpoint under tmp/root, input tmp/in, outputs tmp/out."""
    return ["--bundle_root", _ft_root(tmp), "--input", tmp / "in", "--output_dir", tmp / "out", "--progress", "False",
            *extra]


def _pngs(folder: Path, n: int, shapes=None, name="{:04d}.png") -> Path:
    for i in range(n):
        write_em(folder / name.format(i), em_image(shapes[i] if shapes else (64, 64), seed=i))
    return folder


# ------------------------------------------------------------------------------------------
# the cases: each builds its files under tmp and returns the command-line arguments


@dataclass
class Run:
    bundle: Path
    setup: Callable[[Path], list]
    check: Callable[[Path, subprocess.CompletedProcess], None]
    replaced: tuple[str, ...] = ()


def _same_stem_in_subfolders(tmp):
    _vol(tmp / "in" / "a" / "vol.tif", seed=1)
    _vol(tmp / "in" / "b" / "vol.tif", seed=2)
    return _ft(tmp)


def _check_same_stem_in_subfolders(tmp, res):
    assert res.returncode == 0, tail(res)
    for sub in ("a", "b"):
        assert read_em(tmp / "out" / sub / "vol_seg.tif").shape == (2, 64, 64)
    assert sorted(str(p.relative_to(tmp / "out")) for p in (tmp / "out").rglob("*") if p.is_file()) == [
        "a/vol_seg.tif", "b/vol_seg.tif"]
    assert f"wrote 2 file(s) for 2 input(s) to {tmp / 'out'}" in res.stdout


def _same_stem_same_folder(tmp):
    _vol(tmp / "in" / "x.tif", seed=1)
    _vol(tmp / "in" / "x.tiff", seed=2)
    return _ft(tmp)


def _refused(kind: str, *fragments, bundle: str = "retina_finetune"):
    def check(tmp, res):
        frags = [f.format(tmp=tmp) for f in fragments]
        line = assert_one_line(res, f"{bundle}: {kind} error: ", *frags)
        assert "[retina] [1/" not in res.stdout, "a volume was processed before the refusal"
        print(line)

    check.refusal = True  # nothing may be written: test_inference_never_loses_data compares the file lists
    return check


def _output_is_input(tmp):
    _vol(tmp / "in" / "x.tif")
    return ["--bundle_root", _ft_root(tmp), "--input", tmp / "in", "--output_dir", tmp / "in", "--output_postfix", "",
            "--progress", "False"]


def _existing_output(tmp):
    _vol(tmp / "in" / "x.tif")
    _vol(tmp / "in" / "y.tif", seed=3)
    (tmp / "out").mkdir()
    (tmp / "out" / "x_seg.tif").write_bytes(b"a user's own file, not a TIFF")  # must survive
    return _ft(tmp)


def _existing_output_overwrite(tmp):
    return _existing_output(tmp) + ["--overwrite", "True"]


def _check_overwritten(tmp, res):
    assert res.returncode == 0, tail(res)
    assert read_em(tmp / "out" / "x_seg.tif").shape == (2, 64, 64)
    assert read_em(tmp / "out" / "y_seg.tif").shape == (2, 64, 64)


def _slice_folder(tmp):
    _pngs(tmp / "in" / "stack", 4)  # 0000.png ... 0003.png, 64 x 64
    return ["--bundle_root", _ft_root(tmp), "--input", tmp / "in" / "stack", "--output_dir", tmp / "out",
            "--progress", "False", "--save_probabilities", "True"]


def _check_slice_folder(tmp, res):
    assert res.returncode == 0, tail(res)
    assert f"[retina] {tmp / 'in' / 'stack'}: read as one volume: 4 same-shaped 2D slices 0000.png ... 0003.png" in res.stdout
    assert read_em(tmp / "out" / "stack_seg").shape == (4, 64, 64)
    assert read_em(tmp / "out" / "stack_seg_prob.tif").shape == (4, 64, 64)
    assert sorted(os.listdir(tmp / "out")) == ["stack_seg", "stack_seg_prob.tif"]  # no temporary folder left


def _mixed_shapes_folder(tmp):
    _pngs(tmp / "in", 2, shapes=[(64, 64), (48, 64)], name="img{}.png")
    return _ft(tmp)


def _check_mixed_shapes_folder(tmp, res):
    assert res.returncode == 0, tail(res)
    assert "read as 2 separate input(s), not one slice volume: the images differ in shape" in res.stdout
    assert sorted(os.listdir(tmp / "out")) == ["img0_seg.png", "img1_seg.png"]


def _slice_folder_as_list(tmp):
    _pngs(tmp / "in", 3)
    return _ft(tmp, "--slices_as_volume", "False")


def _check_slice_folder_as_list(tmp, res):
    assert res.returncode == 0, tail(res)
    assert "read as 3 separate input(s) (slices_as_volume False)" in res.stdout
    assert sorted(os.listdir(tmp / "out")) == ["0000_seg.png", "0001_seg.png", "0002_seg.png"]


def _output_in_slice_folder(tmp):
    _pngs(tmp / "in", 3)
    return ["--bundle_root", _ft_root(tmp), "--input", tmp / "in", "--output_dir", tmp / "in", "--progress", "False"]


def _bad_setting(*args):
    def setup(tmp):
        _vol(tmp / "in" / "x.tif")
        return _ft(tmp)[:-2] + list(args)  # without the default --progress False

    return setup


def _tracking(tmp):
    _vol(tmp / "in" / "a" / "v.tif")
    _vol(tmp / "in" / "b" / "v.tif", seed=2)
    return _ft(tmp, "--tracking", "mlflow")


def _check_tracking(tmp, res):
    import mlflow

    assert res.returncode == 0, tail(res)
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'root' / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("retina_finetune_inference").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["input"] == str(tmp / "in") and run.data.params["overwrite"] == "False"
    assert run.data.metrics["volumes_written"] == 2 and run.data.metrics["volumes_failed"] == 0
    (tmp / "dl").mkdir()
    local = client.download_artifacts(run.info.run_id, "outputs.tsv", str(tmp / "dl"))
    rows = [line.split("\t") for line in Path(local).read_text().splitlines()]
    assert rows[0] == ["input", "output", "error"]
    assert sorted(r[1] for r in rows[1:]) == [str(tmp / "out" / "a" / "v_seg.tif"), str(tmp / "out" / "b" / "v_seg.tif")]
    assert not any(n.startswith("config_") for n in os.listdir(tmp / "out"))  # nothing but results in output_dir


# ---- pretraining inference (reconstructions)


def _pre(tmp, *extra):
    ckpt = write_tiny_checkpoint(tmp / "recon.pt", head="reconstruction")
    return ["--bundle_root", tmp / "root", "--dataset_dir", tmp / "ds", "--model_path", ckpt, "--output_dir",
            tmp / "out", *extra]


def _pre_output_on_input(tmp):
    for i in range(2):
        write_em(tmp / "ds" / f"em{i}.png", em_image((64, 64), seed=i))
    return _pre(tmp)[:-2] + ["--output_dir", tmp / "ds"]


def _pre_same_stem_in_subfolders(tmp):
    for sub in ("a", "b"):
        write_em(tmp / "ds" / sub / "em.png", em_image((64, 64), seed=len(sub)))
    return _pre(tmp, "--tracking", "mlflow")


def _check_pre_same_stem(tmp, res):
    import mlflow

    assert res.returncode == 0, tail(res)
    written = sorted(str(p.relative_to(tmp / "out")) for p in (tmp / "out").rglob("*") if p.is_file())
    assert written == ["a/em.png", "b/em.png"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'root' / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("retina_pretrain_inference").experiment_id])
    assert run.data.params["dataset_dir"] == str(tmp / "ds")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["outputs.tsv"]


def _pre_existing(tmp):
    write_em(tmp / "ds" / "em0.png", em_image((64, 64), seed=0))
    write_em(tmp / "out" / "em0.png", em_image((64, 64), seed=9))  # a reconstruction a user keeps
    return _pre(tmp)


RUNS: dict[str, Run] = {
    "same_stem_in_subfolders_both_written": Run(FT, _same_stem_in_subfolders, _check_same_stem_in_subfolders),
    "same_stem_in_one_folder_refused": Run(FT, _same_stem_same_folder, _refused(
        "output", "{tmp}/out/x_seg.tif: 1 output name(s) would be written for more than one input",
        "{tmp}/in/x.tif and {tmp}/in/x.tiff -> {tmp}/out/x_seg.tif")),
    "output_equal_to_input_refused": Run(FT, _output_is_input, _refused(
        "output", "{tmp}/in/x.tif: output would be written over the input {tmp}/in/x.tif")),
    "existing_output_refused": Run(FT, _existing_output, _refused(
        "output", "{tmp}/out/x_seg.tif: output already exists", "--overwrite True")),
    "existing_output_overwritten_with_overwrite_true": Run(
        FT, _existing_output_overwrite, _check_overwritten, replaced=("out/x_seg.tif",)),
    "slice_folder_is_one_volume": Run(FT, _slice_folder, _check_slice_folder),
    "differently_shaped_images_stay_a_list": Run(FT, _mixed_shapes_folder, _check_mixed_shapes_folder),
    "slices_as_volume_false_overrides": Run(FT, _slice_folder_as_list, _check_slice_folder_as_list),
    "output_inside_the_input_slice_folder_refused": Run(FT, _output_in_slice_folder, _refused(
        "output", "{tmp}/in/in_seg: output would be written into the input folder {tmp}/in")),
    "save_probabilities_lowercase_false": Run(FT, _bad_setting("--save_probabilities", "false"), _refused(
        "config", "save_probabilities: expected True or False, got 'false' (str)", "write --save_probabilities True")),
    "progress_lowercase_false": Run(FT, _bad_setting("--progress", "false"), _refused(
        "config", "progress: expected True or False, got 'false' (str)")),
    "overwrite_yes": Run(FT, _bad_setting("--overwrite", "yes"), _refused(
        "config", "overwrite: expected True or False, got 'yes' (str)")),
    "num_classes_abc": Run(FT, _bad_setting("--num_classes", "abc"), _refused(
        "config", "num_classes: expected an integer >= 1, got 'abc' (str)")),
    "overlap_too_big": Run(FT, _bad_setting("--overlap", "1.5"), _refused(
        "config", "overlap: expected a number in [0, 1), got 1.5")),
    "tracking_logs_params_and_outputs": Run(FT, _tracking, _check_tracking),
    "pretrain_output_on_input_refused": Run(PRE, _pre_output_on_input, _refused(
        "output", "output would be written over the input {tmp}/ds/em", bundle="retina_pretrain")),
    "pretrain_same_stem_in_subfolders_both_written_and_tracked": Run(PRE, _pre_same_stem_in_subfolders, _check_pre_same_stem),
    "pretrain_existing_output_refused": Run(PRE, _pre_existing, _refused(
        "output", "{tmp}/out/em0.png: output already exists", bundle="retina_pretrain")),
}


def _selected(session) -> list[str]:
    names = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and item.module.__name__ == __name__ and "name" in spec.params:
            names.append(spec.params["name"])
    return names


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict:
    """Run the selected cases of :data:`RUNS` in one forked runner; keep each one's checksums from before."""
    jobs, kept = [], {}
    for name in _selected(request.session):
        tmp = tmp_path_factory.mktemp(name)
        args = RUNS[name].setup(tmp)
        kept[name] = (tmp, checksums(tmp))
        jobs.append({"name": name, "bundle": RUNS[name].bundle, "configs": INFER, "args": args})
    done = run_forked(jobs, tmp_path_factory.mktemp("runner")) if jobs else {}
    return {name: (done[name], *kept[name]) for name in kept}


@pytest.mark.parametrize("name", list(RUNS))
def test_inference_never_loses_data(name, results):
    res, tmp, before = results[name]
    RUNS[name].check(tmp, res)
    assert_nothing_lost(before, tmp, RUNS[name].replaced)
    if getattr(RUNS[name].check, "refusal", False):
        assert sorted(checksums(tmp)) == sorted(before), "a refused run wrote files"
    print(f"{name}: {res.seconds:.1f} s")


# ------------------------------------------------------------------------------------------
# write_em: folders of slices are renamed into place, files are never replaced without overwrite


def test_a_failure_mid_write_leaves_no_folder(tmp_path, monkeypatch):
    """A slice write that fails half-way (disk full): no folder under the output name, no temporary left."""
    import custom.io.writer as D

    real, calls = D.write_em, []

    def failing(path, array, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:  # the folder call, then slices 0 and 1, then slice 2 fails
            raise OSError(28, "No space left on device", str(path))
        return real(path, array, *args, **kwargs)

    monkeypatch.setattr(D, "write_em", failing)
    with pytest.raises(DatasetError, match="No space left on device"):
        D.write_em(tmp_path / "vol_seg", np.zeros((5, 8, 8), np.uint8))
    assert os.listdir(tmp_path) == []


def _killed_mid_write(target: Path) -> int:
    """Fork; the child writes a 5-slice folder to ``target`` and is SIGKILLed after two slices. Returns its exit code."""
    import custom.io.writer as D

    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            real, n = D.write_em, [0]

            def write(path, array, *args, **kwargs):
                n[0] += 1
                if n[0] == 4:  # the folder call and two slices done, the third next: a real kill
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(path, array, *args, **kwargs)

            D.write_em = write
            D.write_em(target, np.ones((5, 8, 8), np.uint8))
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_kill_mid_write_never_leaves_a_shorter_volume(tmp_path):
    """SIGKILL while a folder of slices is being written: the output name does not exist (so nothing reads
    back as a 2-slice volume); only a hidden temporary sibling is left, which no EM file search lists. An
    earlier complete result under that name stays whole."""
    write_em(tmp_path / "prev_seg", np.zeros((5, 8, 8), np.uint8))
    assert _killed_mid_write(tmp_path / "vol_seg") == -signal.SIGKILL
    assert _killed_mid_write(tmp_path / "prev_seg") == -signal.SIGKILL
    assert not (tmp_path / "vol_seg").exists()
    assert read_em(tmp_path / "prev_seg").shape == (5, 8, 8) and read_em(tmp_path / "prev_seg").max() == 0
    left = sorted(os.listdir(tmp_path))
    assert left[-1] == "prev_seg" and all(n.startswith(".tmp-") for n in left[:-1]) and len(left) == 3, left
    assert find_em_files(tmp_path) == [str(tmp_path / "prev_seg" / f"{z:04d}.png") for z in range(5)]


def test_write_em_overwrite_rules(tmp_path):
    vol = np.ones((3, 8, 8), np.uint8)
    user = tmp_path / "user.tif"
    user.write_bytes(b"keep me")
    for path in (user, tmp_path / "user.nii.gz"):
        if path.suffix == ".gz":
            write_em(path, vol)
        before = _sha(path)
        with pytest.raises(DatasetError, match="already exists; not replaced"):
            write_em(path, vol * 2, overwrite=False)
        assert _sha(path) == before
    write_em(user, vol, overwrite=True)
    assert read_em(user).shape == (3, 8, 8)
    # folders: replaced as a whole (no stale slices of a longer volume), only when they hold nothing but slices
    write_em(tmp_path / "f", np.zeros((5, 8, 8), np.uint8))
    write_em(tmp_path / "f", vol, overwrite=True)
    assert read_em(tmp_path / "f").shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="already exists"):
        write_em(tmp_path / "f", vol, overwrite=False)
    (tmp_path / "f" / "notes.txt").write_text("a user's notes")
    with pytest.raises(DatasetError, match="holds notes.txt, not only image slices; not replaced"):
        write_em(tmp_path / "f", vol)
    assert (tmp_path / "f" / "notes.txt").read_text() == "a user's notes"
    # HDF5 with overwrite=True: the whole file is replaced atomically; the default keeps other datasets
    write_em(tmp_path / "v.h5", vol, key="raw")
    write_em(tmp_path / "v.h5", vol)
    assert read_em(tmp_path / "v.h5", key="raw").shape == (3, 8, 8)
    write_em(tmp_path / "v.h5", vol, overwrite=True)
    with pytest.raises(DatasetError):
        read_em(tmp_path / "v.h5", key="raw")


# ------------------------------------------------------------------------------------------
# planning, in-process


def test_plan_outputs_keeps_sub_folders_and_refuses_what_would_lose_data(tmp_path):
    from custom.errors import ConfigError, OutputError
    from custom.inference import check_outputs, list_inputs, plan_outputs

    src = tmp_path / "in"
    for p in ("a/vol.tif", "b/vol.tif", "c.nii.gz"):
        _vol(src / p)
    inputs = list_inputs(src)
    plan = plan_outputs(inputs, str(tmp_path / "out"), root=str(src), probabilities=3)
    names = ("vol_seg.tif", "vol_seg_prob0.tif", "vol_seg_prob1.tif", "vol_seg_prob2.tif")
    assert plan[str(src / "a" / "vol.tif")] == [str(tmp_path / "out" / "a" / f) for f in names]
    assert plan[str(src / "c.nii.gz")][0] == str(tmp_path / "out" / "c_seg.nii.gz")
    # a single file given as --input: no sub-folder
    assert plan_outputs([str(src / "a" / "vol.tif")], str(tmp_path / "o"), root=str(src / "a" / "vol.tif")) == {
        str(src / "a" / "vol.tif"): [str(tmp_path / "o" / "vol_seg.tif")]}
    # an output folder that is the input folder through a symbolic link
    (tmp_path / "link").symlink_to(src / "a")
    with pytest.raises(OutputError, match="written over the input"):
        plan_outputs([str(src / "a" / "vol.tif")], str(tmp_path / "link"), postfix="")
    # a probability file of one input on another input's label
    with pytest.raises(OutputError, match="more than one input"):
        check_outputs({"/d/x.tif": ["/o/x_seg.tif", "/o/x_seg_prob.tif"], "/d/x_seg_prob.tif": ["/o/x_seg_prob.tif"]})
    with pytest.raises(ConfigError, match="output_ext: expected one of"):
        plan_outputs(inputs, str(tmp_path / "out"), output_ext=".jpg")
    # a slice-folder output may not hide an input inside it
    with pytest.raises(OutputError, match="would replace a folder holding the input"):
        check_outputs({str(src / "s"): [str(src / "a")]}, [str(src / "a" / "vol.tif")])


def test_slice_stack_layouts(tmp_path):
    from custom.inference import slice_stack

    def folder(name, files):
        for f, shape in files.items():
            if len(shape) == 3:
                write_em(tmp_path / name / f, np.zeros(shape, np.uint8))
            else:
                write_em(tmp_path / name / f, em_image(shape, seed=0))
        return tmp_path / name

    assert slice_stack(folder("s", {"s1.png": (16, 16), "s2.png": (16, 16), "s10.png": (16, 16)}))[0]
    assert slice_stack(folder("t", {"z_0001_em.tif": (16, 16), "z_0002_em.tif": (16, 16)}))[1].startswith(
        "2 same-shaped 2D slices z_0001_em.tif ... z_0002_em.tif")
    for name, files, why in [
        ("shapes", {"a1.png": (16, 16), "a2.png": (16, 20)}, "differ in shape"),
        ("mixed3d", {"v1.tif": (2, 16, 16), "v2.tif": (16, 16)}, "is not 2D"),
        ("names", {"cell.png": (16, 16), "mito.png": (16, 16)}, "has no slice number"),
        ("patterns", {"a1.png": (16, 16), "b2.png": (16, 16)}, "2 patterns"),
        ("formats", {"a1.png": (16, 16), "a2.tif": (16, 16)}, "2 patterns"),
        ("one", {"a1.png": (16, 16)}, "1 image file"),
        ("nifti", {"a1.png": (16, 16), "a2.nii.gz": (2, 16, 16)}, "3D formats"),
    ]:
        stack, reason = slice_stack(folder(name, files))
        assert not stack and why in reason, (name, reason)
    write_em(tmp_path / "s" / "sub" / "x.png", em_image((16, 16), seed=0))
    assert slice_stack(tmp_path / "s") == (False, "it has sub-folders (sub)")
