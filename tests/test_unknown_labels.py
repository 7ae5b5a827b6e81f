"""Unknown labels (-1, "not annotated"): kept by every manifest path, counted by verify."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from test_als import low_rank_logits
from test_converters import folder_with_csv

from campar_ray.cfar import als, implicit_als
from campar_ray.cfar.dictionary import build_dictionary, known_mean_filled
from campar_ray.cfar.head import Fc2Split, train_fc2
from campar_ray.cfar.solver import fit_als
from campar_ray.config import AlsSettings
from campar_ray.data import generate_synthetic, labels_matrix, read_manifest, verify_manifest
from campar_ray.data.converters import prepare
from campar_ray.data.manifest import UNKNOWN, write_manifest
from campar_ray.data.pack import pack_manifest
from campar_ray.decision import probabilities
from campar_ray.metrics import choose_threshold, metrics_by_group, par_metrics, summary
from campar_ray.model import ParOutput, bce, positive_ratio, stage1_loss
from campar_ray.run.logits import SplitLogits, write_split_logits


def hide(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """``labels`` with a seeded ``fraction`` of its entries made unknown."""
    hidden = np.random.default_rng(seed).random(labels.shape) < fraction
    return np.where(hidden, UNKNOWN, labels).astype(np.int8)


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> str:
    """A synthetic manifest with a third of its labels unknown."""
    root = tmp_path_factory.mktemp("partial")
    table, info = read_manifest(generate_synthetic(str(root), n=40, size=(32, 16)))
    labels = hide(labels_matrix(table), 1 / 3)
    table = table.set_column(1, "labels", pa.array(labels.tolist(), pa.list_(pa.int8())))
    path = str(root / "partial.parquet")
    write_manifest(path, table, info)
    return path


def test_unknown_labels_round_trip_through_write_read_and_pack(partial, tmp_path):
    table, _ = read_manifest(partial)
    labels = labels_matrix(table)
    assert (labels == UNKNOWN).any() and set(np.unique(labels)) == {UNKNOWN, 0, 1}
    packed = str(tmp_path / "packed")
    pack_manifest(partial, packed, shard_mb=0.02)
    packed_table, _ = read_manifest(packed)
    by_image = dict(zip(table.column("image").to_pylist(), labels.tolist(), strict=True))
    for image, row in zip(packed_table.column("image").to_pylist(),
                          labels_matrix(packed_table).tolist(), strict=True):  # fmt: skip
        assert by_image[image] == row


def test_verify_counts_unknown_labels_per_attribute(partial):
    table, info = read_manifest(partial)
    report = verify_manifest(partial)
    expected = (labels_matrix(table) == UNKNOWN).sum(0)
    assert report.ok
    assert report.unknown == {
        name: int(n) for name, n in zip(info.attributes, expected, strict=True) if n
    }
    first = info.attributes[int(np.flatnonzero(expected)[0])]
    assert f"{first} {report.unknown[first]}" in report.summary()


def test_folder_csv_with_unknowns_is_counted_by_prepare_verify(tmp_path):
    text = "image,split,x,y\na.png,train,1,-1\nb.png,train,-1,-1\nc.png,val,0,1\nd/e.png,test,1,0\n"
    root = folder_with_csv(tmp_path, text)
    report = prepare("folder", str(root), str(root / "m.parquet"), verify=True)
    assert report.verify.unknown == {"x": 1, "y": 2}
    assert "unknown labels (-1) per attribute, of 4 images: x 1, y 2" in report.summary()
    table, _ = read_manifest(report.path)
    np.testing.assert_array_equal(labels_matrix(table), [[1, -1], [-1, -1], [0, 1], [1, 0]])


def test_unknown_labels_round_trip_through_object_storage(partial, s3_server):
    table, info = read_manifest(partial)
    uri = f"{s3_server}/unknown/manifest"
    write_manifest(uri, table, info, shard_mb=0.001)
    again, _ = read_manifest(uri)
    np.testing.assert_array_equal(labels_matrix(again), labels_matrix(table))


# --- stage 1: the loss and the positive rates leave unknowns out -------------------------------


def test_masked_bce_is_each_attributes_mean_over_its_known_images_summed():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-2.0, 1.0, 0.0]])
    targets = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, -1.0]])
    ratio = torch.tensor([0.3, 0.6, 0.1])
    terms = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), reduction="none")
    weights = torch.exp(targets.clamp(min=0) * (1 - ratio) + (1 - targets.clamp(min=0)) * ratio)
    for r, w in ((None, torch.ones_like(terms)), (ratio, weights)):
        expected = sum(
            sum(float(terms[i, j] * w[i, j]) for i in range(3) if targets[i, j] >= 0)
            / int((targets[:, j] >= 0).sum())
            for j in range(3)
        )
        assert bce(logits, targets, r).item() == pytest.approx(expected, rel=1e-6)


def test_unknown_entries_send_no_gradient_and_do_not_move_the_loss():
    targets = torch.tensor([[1.0, -1.0], [0.0, 1.0], [-1.0, 0.0]])
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()
    specific = (logits * 2).detach().requires_grad_()
    loss = stage1_loss(ParOutput(logits, specific, None), targets, torch.tensor([0.5, 0.5]))
    loss.backward()
    unknown = targets < 0
    assert (logits.grad[unknown] == 0).all() and (specific.grad[unknown] == 0).all()
    assert (logits.grad[~unknown] != 0).all()
    moved = logits.detach().clone()
    moved[unknown] = 100.0
    assert bce(moved, targets).item() == bce(logits.detach(), targets).item()


def test_with_every_label_known_the_loss_is_todays_reduction_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 7, generator=generator)
    targets = (torch.rand(16, 7, generator=generator) > 0.6).float()
    ratio = torch.rand(7, generator=generator)
    for r in (None, ratio):
        today = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if r is not None:
            today = today * torch.exp(targets * (1 - r) + (1 - targets) * r)
        assert torch.equal(bce(logits, targets, r), today.sum(dim=1).mean())


def test_positive_ratio_counts_known_labels_only_and_refuses_an_unlabelled_attribute():
    labels = np.array([[1, -1, 0], [0, -1, 1], [-1, -1, 1], [1, -1, -1]])
    labels[0, 1] = 1
    np.testing.assert_allclose(positive_ratio(labels).numpy(), [2 / 3, 1.0, 2 / 3])
    full = np.random.default_rng(0).integers(0, 2, (50, 4))
    assert torch.equal(positive_ratio(full), torch.from_numpy((full > 0).mean(axis=0)).float())
    labels[0, 1] = UNKNOWN
    with pytest.raises(ValueError, match=r"^attribute 'hat' has no known label in the training "):
        positive_ratio(labels, ("male", "hat", "bag"))


# --- metrics: unknown entries are left out, and with none the figures are today's -------------


def reference_par_metrics(labels, probs, threshold=0.5):
    """``campar_ray.metrics.par_metrics`` as it was before unknown labels (commit 052d198),
    frozen here so that the masked version is held to it bit for bit."""
    truth, pred = np.asarray(labels) > 0, np.asarray(probs) >= np.asarray(threshold)
    eps = 1e-20
    tp = (truth & pred).sum(0).astype(np.float64)
    tn = (~truth & ~pred).sum(0).astype(np.float64)
    positives = truth.sum(0).astype(np.float64)
    negatives = (~truth).sum(0).astype(np.float64)
    predicted = pred.sum(0).astype(np.float64)
    label_accuracy = (tp / (positives + eps) + tn / (negatives + eps)) / 2
    attr_precision = tp / (predicted + eps)
    attr_recall = tp / (positives + eps)
    intersection = (truth & pred).sum(1).astype(np.float64)
    union = (truth | pred).sum(1).astype(np.float64)
    accuracy = np.mean(intersection / (union + eps))
    precision = np.mean(intersection / (pred.sum(1) + eps))
    recall = np.mean(intersection / (truth.sum(1) + eps))
    return {
        "mA": float(label_accuracy.mean()),
        "accuracy": float(accuracy),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(2 * precision * recall / (precision + recall + eps)),
        "attr_accuracy": label_accuracy,
        "attr_precision": attr_precision,
        "attr_recall": attr_recall,
        "attr_f1": 2 * attr_precision * attr_recall / (attr_precision + attr_recall + eps),
        "attr_positive_rate": positives / max(len(truth), 1),
        "attr_predicted_rate": predicted / max(len(truth), 1),
    }


@pytest.mark.parametrize("seed", range(5))
def test_with_every_label_known_the_metrics_are_todays_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 60), rng.integers(1, 12)
    labels = (rng.random((n, m)) < rng.random(m)).astype(np.int8)
    probs = rng.random((n, m)).astype(np.float32)
    for threshold in (0.5, rng.random(m), 0.05):
        ours, theirs = (
            par_metrics(labels, probs, threshold),
            reference_par_metrics(labels, probs, threshold),
        )
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert np.array_equal(ours[key], value), key
    grid = np.round(np.linspace(0.05, 0.95, 19), 2)
    best = grid[int(np.argmax([reference_par_metrics(labels, probs, t)["mA"] for t in grid]))]
    assert choose_threshold(labels, probs) == float(best)


@pytest.mark.parametrize("seed", range(5))
def test_unknown_labels_score_as_if_their_entries_were_absent(seed):
    """Each attribute over the images that know it, each image over the attributes it knows:
    the reference metrics of every column (or row) cut down to its known entries."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((40, 6)) < 0.4).astype(np.int8)
    probs = rng.random((40, 6))
    partial = hide(labels, 0.3, seed)
    partial[:, 5] = UNKNOWN  # an attribute no image knows
    partial[3] = UNKNOWN  # an image that knows nothing
    ours = par_metrics(partial, probs)
    terms = []
    for j in range(5):
        rows = partial[:, j] >= 0
        column = reference_par_metrics(labels[rows, j : j + 1], probs[rows, j : j + 1])
        for key in ("attr_accuracy", "attr_precision", "attr_recall", "attr_positive_rate"):
            assert ours[key][j] == pytest.approx(column[key][0], rel=1e-12)
        terms.append(column["attr_accuracy"][0])
    assert np.isnan(ours["attr_accuracy"][5]) and np.isnan(ours["attr_f1"][5])
    assert ours["mA"] == pytest.approx(np.mean(terms), rel=1e-12)
    images = [i for i in range(40) if (partial[i] >= 0).any()]
    per_image = [
        reference_par_metrics(labels[i : i + 1, partial[i] >= 0], probs[i : i + 1, partial[i] >= 0])
        for i in images
    ]
    for key in ("accuracy", "precision", "recall"):
        assert ours[key] == pytest.approx(np.mean([p[key] for p in per_image]), rel=1e-12)
    thresholds = choose_threshold(partial, probs, per_attribute=True)
    assert thresholds[5] == 0.5 and len(thresholds) == 6


def test_metrics_by_group_scores_each_source_on_its_own_rows():
    rng = np.random.default_rng(0)
    labels = (rng.random((30, 4)) < 0.5).astype(np.int8)
    probs = rng.random((30, 4))
    groups = np.array(["peta"] * 18 + ["pa100k"] * 12)
    labels[18:, 3] = UNKNOWN
    scored = metrics_by_group(labels, probs, 0.5, groups)
    assert list(scored) == ["pa100k", "peta"]
    assert scored["peta"] == summary(par_metrics(labels[:18], probs[:18]))
    assert scored["pa100k"]["mA"] == par_metrics(labels[18:, :3], probs[18:, :3])["mA"]


# --- stage 2: unknown training labels are no observation for ALS, left out by k-means and fc2 --

ALS_PARAMS = dict(alpha=10.0, lam=0.1, threshold=0.5)


@pytest.fixture(scope="module")
def partial_logits(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """test_als's low-rank problem with a quarter of its labels unknown: (file, r, known)."""
    logits = low_rank_logits()
    labels = hide((logits > 0).astype(np.int8), 0.25, seed=4)
    names = tuple(f"a{j}" for j in range(logits.shape[1]))
    path = str(tmp_path_factory.mktemp("partial_run") / "logits" / "train.parquet")
    write_split_logits(
        path,
        SplitLogits(
            [f"img{i}.jpg" for i in range(len(logits))], labels, logits - 0.1, logits, names, names
        ),
    )
    return path, probabilities(logits), labels != UNKNOWN


def direct_masked_image_step(r, known, Y, alpha, threshold, lam):
    """x_i = (Y^T C_i Y + lam I)^-1 Y^T C_i p_i with c = 1, p = 0 where unknown, per row."""
    X = np.empty((len(r), Y.shape[1]))
    for i, row in enumerate(r.astype(np.float64)):
        c = np.where(known[i], 1 + alpha * row, 1.0)
        p = (known[i] & (r[i] >= threshold)).astype(np.float64)
        X[i] = np.linalg.solve(Y.T @ np.diag(c) @ Y + lam * np.eye(Y.shape[1]), Y.T @ (c * p))
    return X


def test_masked_image_step_equals_direct_solve_and_implicit(partial_logits):
    from implicit.cpu.als import AlternatingLeastSquares

    _, r, known = partial_logits
    Y = np.random.default_rng(1).normal(size=(r.shape[1], 4))
    expected = direct_masked_image_step(r, known, Y, **ALS_PARAMS)
    batched = als.solve_image_factors(r, Y, als.gram(Y), chunk_rows=7, known=known, **ALS_PARAMS)
    np.testing.assert_allclose(batched, expected, rtol=1e-6, atol=1e-9)
    model = AlternatingLeastSquares(factors=4, regularization=0.1, dtype=np.float64)
    model.item_factors = Y
    matrix = implicit_als.confidence_matrix(r, 10.0, 0.5, known)
    assert matrix.nnz == known.sum()  # an unknown label is an entry implicit does not store
    np.testing.assert_allclose(
        model.recalculate_user(np.arange(len(r)), matrix), expected, rtol=1e-6, atol=1e-6
    )
    stats = als.attribute_stats(r, batched, alpha=10.0, threshold=0.5, known=known)
    direct = als.objective(r, batched, Y, known=known, **ALS_PARAMS)
    assert als.objective_from_stats(stats, Y, lam=0.1) == pytest.approx(direct, rel=1e-10)
    np.testing.assert_allclose(  # the attribute step is the image step of the transpose
        als.solve_attribute_factors(stats, 0.1),
        direct_masked_image_step(r.T, known.T, batched, **ALS_PARAMS),
        rtol=1e-8,
        atol=1e-10,
    )


def test_masked_local_solver_matches_implicit_and_reads_the_mask_from_a_file(partial_logits):
    path, r, known = partial_logits
    fifteen = AlsSettings(factors=4, iterations=15, tol=0.0, **ALS_PARAMS)
    local = fit_als(r, fifteen, solver="local", known=known)
    exact = implicit_als.fit_implicit(
        r, als.initial_attribute_factors(r.shape[1], 4, 0), fifteen, dtype=np.float64, known=known
    )
    np.testing.assert_allclose(local.X, exact.X, atol=1e-6 * np.abs(local.X).max())
    np.testing.assert_allclose(local.Y, exact.Y, atol=1e-6 * np.abs(local.Y).max())
    assert fit_als(path, fifteen, solver="local").objectives == local.objectives
    assert fit_als(r, fifteen, solver="local").objectives != local.objectives


@pytest.mark.ray
@pytest.mark.parametrize("actors", [1, 2])
def test_masked_ray_solver_equals_local_solver(ray_cluster, partial_logits, actors):
    path, r, known = partial_logits
    six = AlsSettings(factors=4, iterations=6, tol=0.0, **ALS_PARAMS)
    local = fit_als(r, six, solver="local", seed=3, known=known)
    sharded = fit_als(path, six, solver="ray", actors=actors, seed=3)
    np.testing.assert_allclose(sharded.objectives, local.objectives, rtol=1e-10)
    np.testing.assert_allclose(sharded.X, local.X, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sharded.Y, local.Y, rtol=1e-8, atol=1e-10)


def test_dictionary_clusters_unknown_entries_at_their_attributes_known_mean():
    rng = np.random.default_rng(0)
    r = rng.random((60, 3)).astype(np.float32)
    known = rng.random((60, 3)) > 0.3
    X = rng.normal(size=(60, 2))
    filled = known_mean_filled(r, known)
    np.testing.assert_array_equal(filled[known], r[known])
    for j in range(3):
        assert np.allclose(filled[~known[:, j], j], r[known[:, j], j].mean())
    masked = build_dictionary(r, X, 5, seed=1, known=known)
    moved = build_dictionary(np.where(known, r, 1 - r), X, 5, seed=1, known=known)
    np.testing.assert_array_equal(masked.keys, moved.keys)  # unknown entries do not count
    np.testing.assert_array_equal(masked.keys, build_dictionary(filled, X, 5, seed=1).keys)


def test_fc2_treats_images_with_no_known_label_as_absent():
    """The masked losses are means over known entries: rows that know nothing weigh nothing,
    in training and in validation, so fc2 fits as if they were not there."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 3)).astype(np.float32)
    labels = (logits + rng.normal(size=(100, 3)) > 0).astype(np.int8)
    r_hat = rng.random((100, 3)).astype(np.float32)
    blank = np.zeros(100, dtype=bool)
    blank[::4] = True  # every fourth image knows no label
    hidden = np.where(blank[:, None], UNKNOWN, labels).astype(np.int8)

    def fit(rows, targets):
        train, val = rows.copy(), rows.copy()
        train[60:], val[:60] = False, False
        return train_fc2(
            Fc2Split(r_hat[train], logits[train], targets[train]),
            Fc2Split(r_hat[val], logits[val], targets[val]),
            lr=0.05,
            epochs=30,
            patience=100,
        )

    everything = np.ones(100, dtype=bool)
    masked, dropped = fit(everything, hidden), fit(~blank, labels)
    np.testing.assert_allclose(masked.curve, dropped.curve, rtol=1e-5)
    assert masked.best_epoch == dropped.best_epoch > 0
    np.testing.assert_allclose(
        masked.head.arrays()["weight"], dropped.head.arrays()["weight"], rtol=1e-4, atol=1e-6
    )
    assert fit(everything, labels).curve != masked.curve


def test_diagnostics_leave_unknown_labels_out():
    from campar_ray.evaluate.diagnostics import floor_ties
    from campar_ray.metrics import attribute_auc

    rng = np.random.default_rng(0)
    labels = (rng.random((50, 3)) < 0.4).astype(np.int8)
    scores = rng.normal(size=(50, 3))
    scores[:10] = scores.min()  # ties at the floor
    partial = hide(labels, 0.3, seed=1)
    auc, ties = attribute_auc(partial, scores), floor_ties(partial, scores)
    for j in range(3):
        rows = partial[:, j] >= 0
        column = labels[rows, j : j + 1]
        assert auc[j] == attribute_auc(column, scores[rows, j : j + 1])[0]
        alone = floor_ties(column, scores[rows, j : j + 1])
        assert ties["negatives"][j] == alone["negatives"][0]
        assert ties["positives"][j] == alone["positives"][0]
