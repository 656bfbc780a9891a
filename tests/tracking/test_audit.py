"""``cromss audit`` end to end on synthetic shards with the session's registered model, and its ranking by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from cromss_ray.cli import main
from cromss_ray.data.scaling import network_input
from cromss_ray.data.schema import MANIFEST_NAME, Manifest, ShardFile, s2_subset_names
from cromss_ray.data.shards import ShardWriter
from cromss_ray.data.storage import TileSet, scan_shards
from cromss_ray.data.synth import synthesize
from cromss_ray.inference.audit import AUDIT_EXPERIMENT, MAPS_FILE, audit_labels
from cromss_ray.method import NoiseDiagnostics
from cromss_ray.models.trust import LabelErrorTally, TrustMaps, check_auditable, decode_map
from cromss_ray.train.pretrain import NOISE_METRICS, build_criterion

LOCATIONS, SIZE, SEASONS = 4, 32, 4


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic 4-season locations of 32 px, with noisy and clean labels."""
    out = tmp_path_factory.mktemp("audit-clean")
    synthesize(out, "pretrain", locations=LOCATIONS, size=SIZE, seed=5, noise_rate=0.3)
    return out


@pytest.fixture(scope="module")
def dw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 Dynamic-World-like tiles of 32 px: one date each, noisy labels only, stored as the raw products."""
    out = tmp_path_factory.mktemp("audit-dw")
    synthesize(out, "dw", locations=LOCATIONS, size=SIZE, seed=7)
    return out


def _direct_maps(registered, shards: Path, epoch: int) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Every tile's trust and weights computed here, one tile at a time, with the method's own selection_maps."""
    tiles = TileSet(scan_shards(str(shards)))
    meta = tiles.meta
    criterion = build_criterion(registered.config, meta.nodata)
    spec = meta.s2.with_bands(s2_subset_names(registered.model.s2_bands))
    maps = {}
    with torch.no_grad():
        for row in tiles.rows():
            by_season = {name: np.array(row[name]).reshape(meta.seasons, *row[name].shape[-3:])
                         for name in ("s1", "s2")}
            labels = {name: np.array(row[name]).reshape(meta.seasons, SIZE, SIZE)
                      for name in ("label", "clean_label") if name in row}
            z1, z2 = registered.model(
                torch.from_numpy(network_input(by_season["s1"], meta.s1)),
                torch.from_numpy(network_input(by_season["s2"], spec)),
            )
            for season in range(meta.seasons):
                picked = slice(season, season + 1)
                season_labels = torch.from_numpy(labels["label"][picked])
                selection = criterion.selection_maps(z1[picked], z2[picked], season_labels, epoch)
                maps[(row["id"], season)] = {
                    **{name: label[season] for name, label in labels.items()},
                    **{f"trust_{b}": selection.trust[i][0].numpy() for i, b in enumerate(("s1", "s2"))},
                    **{f"weight_{b}": selection.weights[i][0].numpy() for i, b in enumerate(("s1", "s2"))},
                }
    return maps


def _check_maps(table, expected: dict) -> list[tuple[str, int]]:
    """The table holds exactly the expected tiles, with their labels, and maps in [0, 1] equal to the direct ones."""
    keys = list(zip(table.column("id").to_pylist(), table.column("season").to_pylist()))
    assert sorted(keys) == sorted(expected)
    for index, key in enumerate(keys):
        assert (table.column("height")[index].as_py(), table.column("width")[index].as_py()) == (SIZE, SIZE)
        direct = expected[key]
        for name in ("label", "clean_label"):
            if name in direct:
                np.testing.assert_array_equal(decode_map(table, name, index), direct[name])
        for branch in ("s1", "s2"):
            trust, weight = decode_map(table, f"trust_{branch}", index), decode_map(table, f"weight_{branch}", index)
            assert trust.min() >= 0 and trust.max() <= 1 and weight.min() >= 0 and weight.max() <= 1
            np.testing.assert_allclose(trust, direct[f"trust_{branch}"], atol=1e-5)
            np.testing.assert_allclose(weight, direct[f"weight_{branch}"], atol=1e-4)
    assert any(decode_map(table, "weight_s2", index).min() < 1 for index in range(table.num_rows)), "selection is on"
    return keys


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
@pytest.mark.slow
def test_audit_with_and_without_clean_labels(
    ray_cluster, registered, clean_shards: Path, dw_shards: Path, tmp_path: Path, capsys
):
    uri = f"models:/{registered.name}@best"
    epoch = registered.config.cromss.ramp_length
    out = tmp_path / "clean"
    options = ["--previews", "2", "--tracking-uri", registered.store, "--rows-per-call", "3"]
    code = main(["audit", "--model", uri, "--data", str(clean_shards), "--out", str(out), *options])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrong-label detection against the clean labels" in printed
    assert "locations by estimated label error" in printed

    table = pq.read_table(out / MAPS_FILE)
    assert table.num_rows == LOCATIONS * SEASONS
    expected = _direct_maps(registered, clean_shards, epoch)
    _check_maps(table, expected)
    # NoiseDiagnostics over the maps computed here, and over the maps written (the latter exactly).
    diagnostics = {branch: NoiseDiagnostics(9, 255) for branch in ("s1", "s2")}
    written = {branch: NoiseDiagnostics(9, 255) for branch in ("s1", "s2")}
    for branch in ("s1", "s2"):
        names = ("label", "clean_label", f"weight_{branch}", f"trust_{branch}")
        for direct in expected.values():
            diagnostics[branch].update(*(torch.tensor(direct[name]) for name in names))
        for index in range(table.num_rows):
            written[branch].update(*(torch.tensor(decode_map(table, name, index)) for name in names))

    # The run: params, the diagnostics exactly as NoiseDiagnostics gives them, the artifacts.
    client = MlflowClient(registered.store)
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id], f"params.data_uri = '{clean_shards}'")
    assert run.data.params["model_uri"] == uri and run.data.params["model_version"] == str(registered.version)
    assert run.data.params["tiles"] == str(LOCATIONS * SEASONS) and run.info.status == "FINISHED"
    for branch, accumulator in diagnostics.items():
        scores, exact = accumulator.compute(), written[branch].compute()
        for name in NOISE_METRICS:
            assert run.data.metrics[f"audit/{branch}/{name}"] == exact[name]
            assert run.data.metrics[f"audit/{branch}/{name}"] == pytest.approx(scores[name], abs=1e-3)
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"rankings", "precision_recall.png", "previews"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "previews")) == 2

    # The location ranking orders by the mean S2 distrust of the labelled pixels, worst first.
    locations = _read_csv(out / "locations.csv")
    errors = {}
    for row_id in {key[0] for key in expected}:
        tiles = [expected[(row_id, season)] for season in range(SEASONS)]
        labelled = np.concatenate([(tile["label"] < 9).ravel() for tile in tiles])
        trust = np.concatenate([tile["trust_s2"].ravel() for tile in tiles])
        errors[row_id] = 1.0 - trust[labelled].astype(np.float64).mean()
    assert [row["id"] for row in locations] == sorted(errors, key=lambda row_id: -errors[row_id])
    for row in locations:
        assert float(row["estimated_error"]) == pytest.approx(errors[row["id"]], abs=1e-5)
        assert 0 <= float(row["noise_rate"]) <= 1

    # Dynamic-World-like tiles without clean labels: one season, rankings without a noise rate, no diagnostics.
    noisy = audit_labels(uri, str(dw_shards), tmp_path / "dw", tracking_uri=registered.store)
    assert noisy.diagnostics == {} and "noise_rate" not in noisy.locations.column_names
    noisy_table = pq.read_table(tmp_path / "dw" / MAPS_FILE)
    assert "clean_label" not in noisy_table.column_names and noisy_table.num_rows == LOCATIONS
    _check_maps(noisy_table, _direct_maps(registered, dw_shards, epoch))
    noisy_run = client.get_run(noisy.run_id)
    assert not any(key.endswith("noise_auroc") for key in noisy_run.data.metrics)
    assert "audit/s2/estimated_error" in noisy_run.data.metrics
    classes = _read_csv(tmp_path / "dw" / "classes.csv")
    assert [float(row["estimated_error"]) for row in classes] == sorted(
        (float(row["estimated_error"]) for row in classes), reverse=True
    )


def test_ranking_by_hand():
    # Two classes, three tiles of 2 x 2 px; 255 is no-data. Trust of the S2 branch and its weights.
    tally = LabelErrorTally(("water", "trees"), "s2", keep_worst=2)
    label = np.array([[0, 0], [1, 255]], dtype=np.uint8)
    tally.add_tile("a", 0, label, np.float32([[0.9, 0.7], [0.2, 0.0]]), np.float32([[1, 1], [0.25, 0]]))
    tally.add_tile("b", 0, label, np.float32([[0.5, 0.5], [0.5, 0.0]]), np.float32([[1, 0.4], [1, 0]]))
    tally.add_tile("a", 1, np.full((2, 2), 1, np.uint8), np.full((2, 2), 1.0, np.float32), np.ones((2, 2), np.float32))
    # Location a: 7 labelled pixels, trust 0.9 + 0.7 + 0.2 + 4 = 5.8, error 1 - 5.8 / 7; one weight below 0.5.
    # Location b: 3 pixels, trust 1.5, error 0.5; one weight below 0.5.
    locations = tally.location_ranking().to_pylist()
    assert [row["id"] for row in locations] == ["b", "a"]
    assert locations[0]["estimated_error"] == pytest.approx(0.5)
    assert locations[1]["estimated_error"] == pytest.approx(1 - 5.8 / 7)
    assert [row["low_weight_share"] for row in locations] == pytest.approx([1 / 3, 1 / 7])
    assert [row["worst_season"] for row in locations] == [0, 0]
    # Water: 4 pixels, trust 2.6, error 0.35; trees: 6 pixels, trust 4.7, error 1 - 4.7 / 6 = 0.2167.
    classes = tally.class_ranking().to_pylist()
    assert [row["name"] for row in classes] == ["water", "trees"]
    assert [row["estimated_error"] for row in classes] == pytest.approx([0.35, 1 - 4.7 / 6])
    assert [row["low_weight_share"] for row in classes] == pytest.approx([1 / 4, 1 / 6])
    assert "noise_rate" not in tally.class_ranking().column_names
    # The least trusted tiles: b season 0 (mean 0.5), then a season 0 (mean 0.6).
    assert [(tile.id, tile.season) for tile in tally.worst_tiles()] == [("b", 0), ("a", 0)]


def test_ranking_counts_the_true_noise_rate_with_clean_labels():
    tally = LabelErrorTally(("water", "trees"), "s1")
    label = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    clean = np.array([[0, 1], [1, 255]], dtype=np.uint8)  # one wrong water label; a pixel without clean label
    tally.add_tile("a", 0, label, np.full((2, 2), 0.5, np.float32), np.ones((2, 2), np.float32), clean)
    assert tally.location_ranking().column("noise_rate").to_pylist() == [0.25]
    assert dict(zip(*tally.class_ranking().select(["name", "noise_rate"]).to_pydict().values())) == {
        "water": 0.5,
        "trees": 0.0,
    }


def test_bad_input_is_named(registered, clean_shards: Path, tmp_path: Path, capsys):
    meta = scan_shards(str(clean_shards)).meta
    with pytest.raises(ValueError, match=r"DATA: the shards label 8 classes .* the model predicts 9"):
        check_auditable(registered.model, 9, meta.model_copy(update={"classes": meta.classes[:8]}), "DATA")
    three_bands = meta.model_copy(update={"s2": meta.s2.with_bands(("B4", "B3", "B2"))})
    with pytest.raises(ValueError, match=r"DATA: the 13-band S2 subset needs bands"):
        check_auditable(registered.model, 9, three_bands, "DATA")
    one_band = meta.model_copy(update={"s1": meta.s1.with_bands(("VV",))})
    with pytest.raises(ValueError, match=r"DATA: the shards store S1 bands \['VV'\]"):
        check_auditable(registered.model, 9, one_band, "DATA")

    missing = f"models:/{registered.name}@nowhere"
    out = tmp_path / "out"
    arguments = ["--tracking-uri", registered.store, "--out", str(out)]
    assert main(["audit", "--model", missing, "--data", str(clean_shards), *arguments]) == 1
    assert "has no alias '@nowhere'" in capsys.readouterr().err

    empty = tmp_path / "empty"
    ShardWriter(empty, meta).close()
    assert main(["audit", "--model", f"models:/{registered.name}@best", "--data", str(empty), *arguments]) == 1
    assert str(empty) in capsys.readouterr().err
    # A shard file with no rows, vouched for by its manifest.
    pq.write_table(meta.arrow_schema().empty_table(), empty / "part-00000.parquet")
    manifest = Manifest(
        kind=meta.kind, metadata=meta, files=[ShardFile(name="part-00000.parquet", rows=0, bytes=0)], total_rows=0,
        class_histogram=[0] * meta.num_classes, nodata_pixels=0,
    )
    (empty / MANIFEST_NAME).write_text(manifest.model_dump_json())
    assert main(["audit", "--model", f"models:/{registered.name}@best", "--data", str(empty), *arguments]) == 1
    assert f"{empty}: the shard set holds no rows" in capsys.readouterr().err

    out.mkdir()
    (out / MAPS_FILE).write_bytes(b"an earlier audit")
    assert main(["audit", "--model", f"models:/{registered.name}@best", "--data", str(clean_shards), *arguments]) == 1
    assert "an audit is already there" in capsys.readouterr().err
    assert (out / MAPS_FILE).read_bytes() == b"an earlier audit"


def test_a_bad_row_is_named_by_file_and_id(registered, clean_shards: Path):
    shards = scan_shards(str(clean_shards))
    table = pq.read_table(shards.files[0])
    labels = table.column("label").to_pylist()
    labels[1] = bytes([200]) + labels[1][1:]  # neither one of the 9 classes nor no-data
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.binary()))
    table = table.append_column("path", pa.array([shards.files[0]] * table.num_rows))
    udf = TrustMaps(registered.model, build_criterion(registered.config, 255), shards.meta, epoch=0)
    bad_id = table.column("id")[1].as_py()
    with pytest.raises(ValueError, match=rf"{shards.files[0]}: .*{bad_id}.*label"):
        udf(table)
