"""``lambdasplit serve --ray``: one command deploys the body on Ray Serve behind wss:// and takes it down on SIGINT;
and what ``deploy`` refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lambdasplit.client import connect_device
from lambdasplit.errors import ConfigError
from lambdasplit.generation import generate
from lambdasplit.rayserve import ReplicaSpec, Scaling, app, deploy
from lambdasplit.server import ServerSettings
from lambdasplit.server.process import body_server_process
from lambdasplit.split import load_split
from lambdasplit.tls import TlsTrust
from tiny_models import NUM_LAYERS

LAYERS = f"1:{NUM_LAYERS - 1}"


def test_serve_ray_local_serves_wss_with_a_pinned_certificate_and_the_token(tiny_checkpoint, tmp_path) -> None:
    path, _ = tiny_checkpoint("llama")
    args = ["--ray", "local", "--replicas", "1", "--cpus-per-replica", "0.5", "--model", str(path)]
    args += ["--layers", LAYERS, "--tls", "--tls-dir", str(tmp_path / "tls")]
    with body_server_process(args, token="t0k", timeout=240) as url:
        assert url.startswith("wss://127.0.0.1:")
        from lambdasplit.tls import self_signed

        pin = self_signed(tmp_path / "tls", ()).fingerprint  # the certificate Serve's proxy presents
        split, client = connect_device(url, path, token="t0k", trust=TlsTrust(fingerprint=pin))
        with client:
            assert client.welcome["replica"]
            got = generate(split, [1, 5, 9, 13], max_new_tokens=12, ignore_eos=True, link=client.open_session())
        local = load_split(path, LAYERS)
        assert got.token_ids == generate(local, [1, 5, 9, 13], max_new_tokens=12, ignore_eos=True).token_ids


def test_serve_ray_options_are_checked_before_anything_starts(tiny_checkpoint) -> None:
    from typer.testing import CliRunner

    from lambdasplit.cli.app import app as cli

    path, _ = tiny_checkpoint("llama")
    result = CliRunner().invoke(cli, ["serve", "--model", str(path), "--replicas", "2"])
    assert result.exit_code != 0 and "--ray" in str(result.exception or result.output)
    result = CliRunner().invoke(cli, ["serve", "--ray", "local", "--cloud-only", "--model", str(path)])
    assert result.exit_code != 0 and "--cloud-only" in str(result.exception or result.output)


def test_a_second_deploy_cannot_move_serves_proxy(ray_cluster, serve_port, tiny_checkpoint) -> None:
    """Serve keeps its first proxy options on a cluster: deploying for another port is refused, not announced."""
    from ray import serve

    path, _ = tiny_checkpoint("llama")
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    with pytest.raises(ConfigError, match="serve shutdown"):
        deploy(ReplicaSpec(str(path), LAYERS, ServerSettings(port=serve_port + 1)), Scaling())


def test_the_serve_config_builder_takes_limits_and_scaling_and_refuses_the_rest() -> None:
    application = app({"model": "smollm2-135m-instruct", "autoscale": "1:3", "target_sessions": 4, "max_sessions": 9})
    deployment = application._bound_deployment
    assert deployment.max_ongoing_requests == 9  # the session cap, not Serve's default of 5
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ConfigError, match="unknown lambdasplit args port"):
        app({"model": "x", "port": 1})
    with pytest.raises(ConfigError, match=r"args\.model"):
        app({})


def test_the_serve_config_and_the_kuberay_manifest_in_the_docs_build_the_application() -> None:
    import importlib
    import re
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = (Path(__file__).parents[2] / "docs" / "ray.md").read_text()
    serve_file, manifest = (yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S))
    assert manifest["kind"] == "RayService"
    for config in (serve_file, yaml.safe_load(manifest["spec"]["serveConfigV2"])):
        schema = ServeDeploySchema.model_validate(config)
        assert schema.http_options.ssl_certfile and schema.http_options.ssl_keyfile  # wss:// by default
        (application,) = schema.applications
        module, name = application.import_path.split(":")
        assert getattr(importlib.import_module(module), name) is app
        built = app(application.args)
        assert built._bound_deployment.max_ongoing_requests == application.args.get("max_sessions", 64)


def test_a_port_in_use_is_refused_clearly_and_port_0_takes_another() -> None:
    """Serve's proxy needs a fixed port: on one in use it says so (not Ray's traceback); with port 0 a free port
    is picked, and another when a process takes it first (the race ``serve --ray --port 0`` had)."""
    script = Path(__file__).with_name("proxy_ports.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"could not listen on 127.0.0.1:{result['taken']}: the port is in use" in result["explicit"]
    assert result["chosen"] != result["taken"] and result["listening"] is True
