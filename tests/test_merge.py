"""``campar prepare merge``: several manifests in one attribute space, unknown where unlabelled."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from cli_checks import one_line, run_campar

from campar_ray.data import generate_synthetic, labels_matrix, read_manifest, verify_manifest
from campar_ray.data.converters import DatasetError, prepare
from campar_ray.data.manifest import UNKNOWN, ManifestInfo, write_manifest

RENAMED = {"female": "isWoman", "hat": "headwear", "backpack": "bagOnBack"}
"""Dataset ``b`` names three of the synthetic attributes its own way."""
B_KEEPS = ("female", "hat", "backpack", "handbag", "long_hair")


def two_datasets(root) -> tuple[str, str]:
    """``a``: synthetic as it is; ``b``: other images, five attributes, three renamed."""
    a_table, a_info = read_manifest(generate_synthetic(str(root / "a"), n=20, size=(32, 16)))
    a = str(root / "a" / "a.parquet")
    write_manifest(a, a_table, dataclasses.replace(a_info, dataset="a"))
    b_table, info = read_manifest(generate_synthetic(str(root / "b"), n=16, size=(32, 16), seed=1))
    keep = [info.attributes.index(name) for name in B_KEEPS]
    names = tuple(RENAMED.get(name, name) for name in B_KEEPS)
    labels = labels_matrix(b_table)[:, keep]
    b_table = b_table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8())))
    b_table = b_table.set_column(4, "source", pa.array(["cam_b"] * b_table.num_rows))
    b = str(root / "b" / "b.parquet")
    write_manifest(b, b_table, ManifestInfo("b", names, names[:3]))
    return a, b


@pytest.fixture
def attribute_map(tmp_path) -> str:
    path = tmp_path / "map.yaml"
    path.write_text(
        "datasets:\n  b: {isWoman: female, headwear: hat, bagOnBack: backpack}\n"
        "  pa100k: {Female: female}  # a dataset not merged here is ignored\n"
    )
    return str(path)


def test_merge_renames_keeps_sources_and_marks_unmapped_attributes_unknown(tmp_path, attribute_map):
    a, b = two_datasets(tmp_path)
    report = prepare(
        "merge", "", str(tmp_path / "merged.parquet"), manifests=f"{a},{b}",
        attribute_map=attribute_map, verify=True,
    )  # fmt: skip
    assert report.verify.ok
    table, info = read_manifest(report.path)
    a_table, a_info = read_manifest(a)
    b_table, _ = read_manifest(b)
    assert info.dataset == "merged" and info.attributes == a_info.attributes
    assert info.eval_attributes == a_info.eval_attributes
    labels = labels_matrix(table)
    np.testing.assert_array_equal(labels[:20], labels_matrix(a_table))
    b_labels = labels_matrix(b_table)
    for j, name in enumerate(info.attributes):
        expected = b_labels[:, B_KEEPS.index(name)] if name in B_KEEPS else UNKNOWN
        np.testing.assert_array_equal(labels[20:, j], expected)
    assert table.column("source").to_pylist() == ["synthetic"] * 20 + ["cam_b"] * 16
    assert table.column("split").to_pylist() == (
        a_table.column("split").to_pylist() + b_table.column("split").to_pylist()
    )
    assert table.column("identity").to_pylist()[20] == "b:" + b_table.column("identity")[0].as_py()
    assert table.column("image").to_pylist()[:2] == [
        f"a/{image}" for image in a_table.column("image").to_pylist()[:2]
    ]
    assert verify_manifest(report.path).unknown == {
        name: 16 for name in info.attributes if name not in B_KEEPS
    }


def test_merge_without_a_map_keeps_every_name(tmp_path):
    a, b = two_datasets(tmp_path)
    report = prepare("merge", "", str(tmp_path / "m.parquet"), manifests=f"{a},{b}")
    _, info = read_manifest(report.path)
    assert info.attributes[-3:] == ("isWoman", "headwear", "bagOnBack")


def test_a_unified_list_orders_and_drops_attributes(tmp_path, attribute_map):
    a, b = two_datasets(tmp_path)
    text = (tmp_path / "map.yaml").read_text()
    (tmp_path / "map.yaml").write_text(
        text + "attributes: [hat, female, handbag]\neval_attributes: [female]\n"
    )
    report = prepare(
        "merge", "", str(tmp_path / "m.parquet"), manifests=f"{a},{b}", attribute_map=attribute_map
    )
    table, info = read_manifest(report.path)
    assert info.attributes == ("hat", "female", "handbag") and info.eval_attributes == ("female",)
    assert report.dropped == {
        "attributes of a outside the unified space": 14,
        "attributes of b outside the unified space": 2,
    }
    assert (labels_matrix(table) != UNKNOWN).all()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("datasets:\n  b: {isMan: male}\n", r"dataset 'b' has no attribute 'isMan'"),
        ("datasets:\n  b: {isWoman: handbag}\n", r"two attributes of dataset 'b' .* to 'handbag'"),
        ("datasets: [1, 2]\n", r"'datasets' must map each dataset name to"),
        ("colours: {}\n", r"must be a mapping with the keys attributes, eval_attributes and"),
        ("attributes: [a]\neval_attributes: [b]\n", r"eval_attributes names 'b', which is not"),
        ("datasets: {b: {isWoman: female\n", r"is not valid YAML"),
    ],
)
def test_bad_attribute_maps_are_named(tmp_path, text, expected):
    a, b = two_datasets(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(DatasetError, match=expected):
        prepare("merge", "", str(tmp_path / "m.parquet"), manifests=f"{a},{b}",
                attribute_map=str(tmp_path / "bad.yaml"))  # fmt: skip
    assert not (tmp_path / "m.parquet").exists()


def test_merge_command_and_its_one_line_errors(tmp_path, attribute_map, capsys):
    a, b = two_datasets(tmp_path)
    out = str(tmp_path / "merged.parquet")
    code, stdout, _ = run_campar(
        capsys, "prepare", "merge", "--manifests", f"{a},{b}", "--attribute-map", attribute_map,
        "--out", out, "--name", "ab", "--verify",
    )  # fmt: skip
    assert code == 0
    assert "ab, 36 images" in stdout and "unknown labels (-1) per attribute, of 36 images" in stdout
    code, _, err = run_campar(capsys, "prepare", "merge", "--manifests", a, "--out", out + "2")
    assert code == 2 and "merge takes two or more manifests" in one_line(err)
    code, _, err = run_campar(capsys, "prepare", "merge", "--manifests", f"{a},{tmp_path}/no",
                              "--out", out + "3")  # fmt: skip
    assert code == 2 and "manifest not found" in one_line(err)
    code, _, err = run_campar(capsys, "prepare", "merge", "--manifests", f"{a},{b}", "--out",
                              str(tmp_path / "shards"))  # fmt: skip
    assert code == 2 and f"is outside {tmp_path / 'shards'}; pass --allow-outside-root" in err
    code, _, err = run_campar(capsys, "prepare", "merge", "--manifests", f"{a},{b}", "--out",
                              str(tmp_path / "shards"), "--root", str(tmp_path))  # fmt: skip
    assert code == 0, err


def test_the_shipped_peta_pa100k_map_names_real_peta_attributes():
    from campar_ray.data.converters import peta
    from campar_ray.data.converters.merge import read_attribute_map

    path = pathlib.Path(__file__).parents[1] / "configs" / "attribute_maps" / "peta_pa100k.yaml"
    mapping = read_attribute_map(str(path))
    assert set(mapping.datasets) == {"peta", "pa100k"}
    assert set(mapping.datasets["peta"]) <= set(peta.ATTRIBUTES)
    for names in mapping.datasets.values():
        assert sorted(names.values()) == sorted(mapping.attributes)
    info = ManifestInfo("peta", peta.ATTRIBUTES, peta.EVALUATED)
    renamed = mapping.rename(info, str(path))
    assert sum(name in mapping.attributes for name in renamed) == 12
