"""What the Serve endpoint reveals about its host: /model's body keeps no absolute path or URI (no Ray here)."""

from __future__ import annotations

from ncf_ray.serve import public_paths


def test_public_paths_cuts_paths_and_uris_to_their_last_component():
    body = {
        "model_dir": "/srv/models/run7/model",
        "dataset_meta": {"source": "/home/alice/data/ratings.csv", "seed": 1, "protocol": "leave-one-out-by-time"},
        "metrics": {"config": {"pretrain_from": ["/data/gmf/model", "C:\\runs\\mlp\\model"]},
                    "dataset": "s3://bucket/logs/2026/", "valid": {"hr@10": 0.5}},
        "note": "bf16 shortlist, fp32 re-rank",
        "home": "~/x/y",
    }
    out = public_paths(body)
    assert out["model_dir"] == "model"
    assert out["dataset_meta"] == {"source": "ratings.csv", "seed": 1, "protocol": "leave-one-out-by-time"}
    assert out["metrics"]["config"]["pretrain_from"] == ["model", "model"]
    assert out["metrics"]["dataset"] == "2026" and out["metrics"]["valid"] == {"hr@10": 0.5}
    assert out["note"] == "bf16 shortlist, fp32 re-rank" and out["home"] == "y"
    assert "/" not in str(out).replace("bf16 shortlist, fp32", "")  # nothing path-like left anywhere
