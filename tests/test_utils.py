"""Tests for custom/utils.py: the helpers every part of ``custom`` shares (atomic writes, file stems,
natural order, plane names, paths within a folder, command-line values, short lists)."""

from __future__ import annotations

import os

import pytest

from custom.utils import (
    atomic_path,
    file_stem,
    is_within,
    literal_value,
    natural_key,
    plane_list,
    short_list,
    temp_name,
)


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-") and tmp.name.endswith("-a.json")
        tmp.write_text("one")
        assert not target.exists()  # nothing under the real name until the block succeeds
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "one" and os.listdir(target.parent) == ["a.json"]
    with atomic_path(target) as tmp:  # replace=True (default) replaces
        tmp.write_text("two")
    assert target.read_text() == "two"


def test_atomic_path_without_replace_never_replaces(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError) as e:
        with atomic_path(target, replace=False) as tmp:
            tmp.write_text("other")
    assert e.value.filename == str(target) and target.read_text() == "mine"
    late = tmp_path / "late.txt"
    with pytest.raises(FileExistsError):  # appeared while the block was writing: still not replaced
        with atomic_path(late, replace=False) as tmp:
            tmp.write_text("new")
            late.write_text("theirs")
    assert late.read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["a.txt", "late.txt"]
    assert temp_name(target, ".old").name.startswith(".old-")


def test_file_stem():
    assert file_stem("/d/vol.nii.gz") == "vol" and file_stem("VOL.NII.GZ") == "VOL"
    assert file_stem("a/b/s12.png") == "s12" and file_stem("x.ome.tif") == "x"
    assert file_stem("folder/") == "folder" and file_stem("noext") == "noext"


def test_natural_key_orders_numbers_as_numbers():
    assert sorted(["s10.png", "S2.png", "s1.png"], key=natural_key) == ["s1.png", "S2.png", "s10.png"]


def test_plane_list():
    assert plane_list("xy") == ["xy"] and plane_list("orthoplane") == ["xy", "xz", "yz"]
    assert plane_list(("yz", "xy")) == ["yz", "xy"]
    for bad in ("xx", [], ["xy", "zz"]):
        with pytest.raises(ValueError, match="planes must be"):
            plane_list(bad)


def test_is_within_resolves_links_and_dot_dots(tmp_path):
    configs = tmp_path / "configs"
    (configs / "sub").mkdir(parents=True)
    (tmp_path / "configs-old").mkdir()
    assert is_within(configs, configs) and is_within(configs / "sub" / "a.json", configs)
    assert not is_within(tmp_path / "configs-old" / "a.json", configs)  # a longer name, not a sub-folder
    assert not is_within(configs / ".." / "elsewhere.json", configs)
    (configs / "out").symlink_to(tmp_path / "configs-old")  # a link in the folder to a place outside it
    assert not is_within(configs / "out" / "a.json", configs)
    (tmp_path / "in").symlink_to(configs / "sub")  # a link outside the folder to a place in it
    assert is_within(tmp_path / "in" / "a.json", configs) and is_within(str(configs / "sub"), str(configs))


def test_literal_value_reads_literals_and_keeps_other_text(tmp_path):
    assert literal_value("3") == 3 and literal_value("1e12") == 1e12 and literal_value("[1, 2]") == [1, 2]
    assert literal_value("False") is False and literal_value("None") is None
    assert literal_value("{'a': 'b'}") == {"a": "b"}
    for text in ("false", "abc", "1 +", "configs/train.json"):
        assert literal_value(text) == text
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w')"
    assert literal_value(code) == code and not marker.exists()  # code stays text, never runs


def test_short_list_names_the_first_few():
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert short_list(names) == "a.png, b.png, c.png and 2 more"
    assert short_list(names[:3]) == "a.png, b.png, c.png" and short_list(names, limit=1) == "a.png and 4 more"
    assert short_list([]) == ""


def test_class_name_reads_a_config_mapping_a_sequence_or_falls_back():
    from custom.utils import class_name

    assert class_name(1, {"0": "background", "1": "mito"}) == "mito"  # label_names from JSON: str keys
    assert class_name(2, {2: "er"}) == "er"
    assert class_name(1, ["background", "mito"]) == "mito"
    assert class_name(3, ["background", "mito"]) == "class_3"
    assert class_name(3, {"0": "background"}, fallback="class{}") == "class3"
    assert class_name(0, None) == "class_0"
