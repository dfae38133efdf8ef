"""W&B with an API key but no network (cluster compute nodes): the run logs offline with one
warning that says how to sync it later, and a logging failure never stops training."""

from __future__ import annotations

import socket
import warnings

import pytest

from lsg import loggers


def closed_port_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def key_but_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return {"name": "wandb", "project": "lsg-test", "mode": "auto", "save_dir": str(tmp_path / "wandb"),
            "probe_timeout_s": 2.0, "init_timeout_s": 20.0}


def test_api_key_without_network_falls_back_to_offline_with_one_warning(key_but_no_network):
    assert loggers.wandb_mode("auto") == "online"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = loggers.build_logger(key_but_no_network, "run", {"a": 1})
    try:
        ours = [w for w in caught if "W&B" in str(w.message)]
        assert len(ours) == 1 and "unreachable" in str(ours[0].message)
        assert "wandb sync" in str(ours[0].message)
        assert logger.experiment.settings.mode == "offline"
    finally:
        logger.experiment.finish()


def test_wandb_init_failure_online_retries_offline_and_never_raises(key_but_no_network, monkeypatch):
    import wandb

    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("Failed to get resume status: context deadline exceeded")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(loggers, "server_reachable", lambda url, timeout_s: True)  # the probe passes...
    monkeypatch.setattr(wandb, "init", init)  # ...but the server never answers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = loggers.start_run(key_but_no_network, "compare")
    try:
        assert run is not None and run.settings.mode == "offline"
        assert any("CommError" in str(w.message) and "wandb sync" in str(w.message) for w in caught)
    finally:
        run.finish()

    def always_fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", always_fails)
    with pytest.warns(RuntimeWarning, match="continues without a logger"):
        assert loggers.build_logger(key_but_no_network, "run") is False
