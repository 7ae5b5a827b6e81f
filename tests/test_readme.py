"""The README's data and training command blocks run as written, on small data.

The blocks are the fenced ``bash`` blocks that follow a ``<!-- readme-test: NAME -->`` comment
in the README (invisible when rendered). Each line is run through ``campar``'s own entry point
(``campar_ray.cli.main``, in this process, so the session's Ray cluster serves the training)
from a folder laid out like a fresh clone: ``configs/`` beside the commands' working
directory and PETA at ``../shared/datasets/peta``, where the repository's checkout finds it.

What changes, and why (nothing else does):

- The datasets are small ones in each format's real layout, written by the test: a 40-image
  PETA (with a ``PETA.mat`` in Rethinking_of_PAR's layout), PA100K, RAP v1/v2 and a folder +
  CSV. The relative ``../shared/datasets/peta`` is used as written.
- ``/data/`` (the README's placeholder for a dataset folder) becomes the test's temporary
  folder: a test cannot write to ``/data``.
- The training line that ``--subset`` marks as the quick check runs for real with
  :data:`cli_checks.TINY_TRAIN` appended (ResNet-18 at 32 x 16, one worker): the default
  ResNet-50 at 256 x 192 takes many minutes on a 2-core CI machine. The other training lines
  need what a test machine lacks (the GPU recipe's four GPU workers and downloaded ImageNet
  weights, a cached ``timm`` checkpoint), so they are parsed by ``campar``'s parser and their
  configuration is built and checked (keys, choices and ranges), with the README's
  placeholders ``M`` and ``D`` read as the manifest the data block wrote and a run folder.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from cli_checks import TINY_TRAIN
from test_converters import cells, write_images, write_rap1, write_rap2
from test_peta import peta_fixture
from test_peta_mat import label_line, write_peta_mat

from campar_ray import cli
from campar_ray.config import load_config
from campar_ray.data import read_manifest
from campar_ray.data.converters.peta import EVALUATED

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = re.compile(r"<!-- readme-test: (\w+)[^>]*-->\n```bash\n(.*?)```", re.DOTALL)
PERSONS = 10
"""Persons per PETA subset, two images each: enough for a person-disjoint train/val/test."""


def readme_blocks() -> dict[str, list[list[str]]]:
    """Each marked block's commands, as argument lists: continuation lines joined, comments
    dropped."""
    blocks = {}
    for name, body in MARK.findall(README.read_text()):
        text = body.replace("\\\n", " ")
        blocks[name] = [shlex.split(line, comments=True) for line in text.splitlines()]
        blocks[name] = [argv for argv in blocks[name] if argv]
    return blocks


def on_small_data(argv: list[str], datasets: Path) -> list[str]:
    """``argv`` with the README's ``/data/`` folders moved under ``datasets``."""
    assert argv[0] == "campar", argv
    return [re.sub(r"^/data/", f"{datasets}/", arg) for arg in argv[1:]]


def tiny_peta(base: Path) -> Path:
    """A PETA folder at ``base/peta``: two real subsets of ``PERSONS`` persons, two images each,
    with labels that vary over the evaluated attributes."""
    lines, files = {}, {}
    for offset, subset in enumerate(("3DPeS", "GRID")):
        rows = []
        for person in range(1, PERSONS + 1):
            sex = "personalMale" if (person + offset) % 2 else "personalFemale"
            present = [a for i, a in enumerate(EVALUATED) if (i + person + offset) % 3 == 0]
            rows.append(" ".join([str(person), sex, *present]))
        lines[subset] = "\n".join(rows) + "\n"
        files[subset] = [f"{person}_{k}.jpg" for person in range(1, PERSONS + 1) for k in (1, 2)]
    return peta_fixture(base, lines, files)


def peta_with_mat(root: Path) -> None:
    """Rethinking_of_PAR's ``PETA.mat`` under ``root`` (a :func:`tiny_peta` copy): one row
    per image, labels as its ``Label.txt`` says, five partitions of about 50/10/40 %."""
    people = [
        (subset, person, label_line(root, subset, person))
        for subset in ("3DPeS", "GRID")
        for person in range(1, PERSONS + 1)
        for _ in (1, 2)
    ]
    partitions = []
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(people)) + 1
        partitions.append((order[:20], order[20:24], order[24:]))
    write_peta_mat(root / "PETA.mat", people, partitions)


def tiny_pa100k(root: Path) -> None:
    """A PA100K folder whose attributes are those the README's attribute map names."""
    attribute_map = yaml.safe_load((REPO / "configs/attribute_maps/peta_pa100k.yaml").read_text())
    attributes = list(attribute_map["datasets"]["pa100k"])
    names = {"train": ["000001.jpg", "000002.jpg", "000003.jpg"], "val": ["000004.jpg"],
             "test": ["000005.jpg", "000006.jpg"]}  # fmt: skip
    rng = np.random.default_rng(0)
    mat = {f"{split}_images_name": cells(images) for split, images in names.items()}
    mat |= {
        f"{split}_label": rng.integers(0, 2, (len(images), len(attributes))).astype(np.uint8)
        for split, images in names.items()
    }
    mat["attributes"] = cells(attributes)
    root.mkdir(parents=True)
    scipy.io.savemat(root / "annotation.mat", mat)
    write_images(root / "data", [image for images in names.values() for image in images])


def folder_corpus(root: Path) -> None:
    images = [f"{index}.png" for index in range(10)]
    write_images(root, images)
    rows = [f"{image},{index % 2},{index // 5}" for index, image in enumerate(images)]
    (root / "labels.csv").write_text("\n".join(["image,hat,bag", *rows]) + "\n")


@dataclass(frozen=True)
class Clone:
    work: Path
    """The commands' working directory, a fresh clone's (with its ``configs/``)."""
    printed: str
    """What the data blocks printed."""


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    """The data blocks run once for the module, from a fresh clone's working directory: PETA
    in ``../shared/datasets/peta``, the other datasets where ``/data/`` points. The tests run
    in that directory, as the README's commands do."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "clone"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")
    peta = tiny_peta(root / "shared" / "datasets")
    shutil.copytree(peta, root / "PETA")
    peta_with_mat(root / "PETA")
    tiny_pa100k(root / "PA100k")
    write_rap1(root / "RAP")
    write_rap2(root / "RAPv2")
    folder_corpus(root / "my_corpus")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.chdir(work)
        blocks = readme_blocks()
        for argv in blocks["data"] + blocks["merge"]:
            run(on_small_data(argv, root))
        yield Clone(work, printed.getvalue())


def run(argv: list[str]) -> None:
    code = cli.main(argv)
    assert code == 0, f"campar {shlex.join(argv)} exited {code}"


def test_the_readme_marks_its_data_and_training_blocks():
    blocks = readme_blocks()
    assert set(blocks) == {"data", "merge", "train"}
    assert {argv[1] for argv in blocks["data"] + blocks["merge"]} == {"prepare"}
    assert {argv[1] for argv in blocks["train"]} == {"train"}
    assert sum("--subset" in argv for argv in blocks["train"]) == 1  # the quick check


def test_the_data_blocks_run_as_written(clone):
    for manifest in ("synth/manifest", "peta", "peta0", "pa100k", "rap1", "rap2", "mine",
                     "peta_pa100k"):  # fmt: skip
        assert (clone.work / "data" / f"{manifest}.parquet").is_file(), clone.printed
    table, _ = read_manifest(str(clone.work / "data" / "peta0.parquet"))
    assert table.num_rows == 40  # every image PETA.mat lists, split by its partition 0
    assert "outside the manifest's folder" in clone.printed  # prepare's note on peta.parquet


@pytest.mark.ray
def test_the_training_block_runs_as_written(ray_cluster, clone, capsys):
    datasets = clone.work.parent
    lines = readme_blocks()["train"]
    (quick,) = [argv for argv in lines if "--subset" in argv]
    placeholders = {"M": "data/peta.parquet", "D": "runs/variant"}
    for argv in lines:
        args = cli.build_parser().parse_args(
            [placeholders.get(arg, arg) for arg in on_small_data(argv, datasets)]
        )
        config = load_config(args.config, cli._overrides(args))
        assert Path(config.data.manifest).is_file(), argv  # every line names a real manifest
    capsys.readouterr()
    run([*on_small_data(quick, datasets), *TINY_TRAIN])
    assert "best checkpoint:" in capsys.readouterr().out
    assert (clone.work / "runs" / "quick" / "logits" / "test.parquet").is_file()
