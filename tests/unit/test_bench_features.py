"""`ncf-ray bench features --quick` (no Ray): every family measured featured vs ID-only in the same process."""

from __future__ import annotations

from ncf_ray import bench
from ncf_ray.bench import features


def test_quick_bench_measures_every_family_against_its_id_only_model():
    res = features.measure(quick=True)
    assert [r["family"] for r in res["families"]] == list(features.FAMILIES)
    assert len(res["rows"]) == len(features.FAMILIES)
    for fam, r in zip(res["families"], res["rows"]):
        assert r["value"] == fam["features_samples_per_s"] > 0 and r["baseline_value"] == fam["id_samples_per_s"] > 0
        assert abs(r["ratio"] - r["value"] / r["baseline_value"]) < 1e-9
        # The featured model really carries the feature path: it has more parameters than the ID-only one.
        assert fam["parameters"]["features"] > fam["parameters"]["id"]
    assert "features" in bench.BENCHES and bench.RUNNERS["features"] == "ncf_ray.bench.features"


def test_synthetic_tables_follow_the_global_id_layout():
    table = features.synthetic_table(50, features.ITEM_COLUMNS, 0)
    assert table.slots == sum(s for *_, s in features.ITEM_COLUMNS)
    assert table.n_ids == 1 + sum(1 + v for _, v, _ in features.ITEM_COLUMNS)
    first = table.ids[:, 0]
    assert bool(((first >= 2) & (first < 2 + features.ITEM_COLUMNS[0][1])).all())  # genres: a real code, never 0
    assert int(table.ids.min()) >= 0 and int(table.ids.max()) < table.n_ids
