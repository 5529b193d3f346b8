"""The tracking server with authentication (MLflow's basic-auth app), credentials from the environment.

Commands take credentials only from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's
client reads them); a config that holds them is refused without echoing them.
"""

from __future__ import annotations

import mlflow
import pytest

from servers import mlflow_server
from urbancross.cli import main
from urbancross.config import ConfigError, config_from_dict
from urbancross.tracking import mlflow_run

ADMIN_PASSWORD = "s3cret-for-tests-only"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-server")
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root}/basic_auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests-only"}
    with mlflow_server(root, "--app-name", "basic-auth", env=env) as uri:
        yield uri


def test_commands_authenticate_with_credentials_from_the_environment(auth_server, tmp_path, monkeypatch):
    cfg = config_from_dict({"out_dir": str(tmp_path), "mlflow": {"tracking_uri": auth_server, "experiment": "auth"}})
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|[Uu]nauthenticated|credentials"):
        with mlflow_run(cfg, "anonymous"):
            pass
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|[Uu]nauthenticated|credentials"):
        with mlflow_run(cfg, "wrong password"):
            pass
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    with mlflow_run(cfg, "authenticated") as run:
        mlflow.log_metric("x", 1.0)
    got = mlflow.MlflowClient(auth_server).get_run(run.info.run_id)
    assert got.data.metrics["x"] == 1.0
    assert not any(ADMIN_PASSWORD in str(v) for v in got.data.params.values())  # the config logged as params holds no secret


def test_credentials_in_a_config_are_refused_without_showing_them(tmp_path, capsys):
    with pytest.raises(ConfigError, match="must not hold credentials") as e:
        config_from_dict({"mlflow": {"tracking_uri": f"https://admin:{ADMIN_PASSWORD}@mlflow.example:5000"}})
    assert ADMIN_PASSWORD not in str(e.value)
    config = tmp_path / "c.yaml"
    config.write_text(f"mlflow:\n  tracking_uri: http://admin:{ADMIN_PASSWORD}@127.0.0.1:1\n")
    assert main(["promote", "--config", str(config), "--run", "0" * 32]) != 0
    err = capsys.readouterr().err
    assert "must not hold credentials" in err and ADMIN_PASSWORD not in err
    assert main(["promote", "--run", "0" * 32, "--set", f"mlflow.tracking_uri=http://u:{ADMIN_PASSWORD}@127.0.0.1:1"]) != 0
    err = capsys.readouterr().err
    assert "must not hold credentials" in err and ADMIN_PASSWORD not in err
