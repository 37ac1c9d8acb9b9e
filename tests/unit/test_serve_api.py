"""`hvdtrain serve`'s parts that need neither Ray nor TensorFlow: TensorFlow Serving's REST API (endpoints, a predict
request read and checked, the answers' bodies), the `serve` settings, what MODEL names, the replica ceiling, and the
one line a missing [serve] extra gets. The server itself runs in tests/integration/test_serve.py."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env
from hvdtrain.config import ConfigError, load_config
from hvdtrain.errors import UserError
from hvdtrain.serve import default_name, settings_for
from hvdtrain.serve.protocol import BadRequest, Signature, Tensor, endpoint, metadata_body, parse_predict, predict_body
from hvdtrain.serve.server import check_port, max_replicas

DIGITS = Signature(Tensor("input_layer", (8, 8, 1)), Tensor("dense_2", (10,)))


def parse(body, limit: int = 100):
    return parse_predict(body if isinstance(body, bytes) else json.dumps(body).encode(), DIGITS, limit)


def refused(body, limit: int = 100) -> str:
    with pytest.raises(BadRequest) as caught:
        parse(body, limit)
    assert caught.value.status == 400
    return str(caught.value)


def test_instances_in_the_models_shape_flat_or_named_give_the_same_float32_batch():
    x = np.random.default_rng(0).random((3, 8, 8, 1))
    shaped = parse({"instances": x.tolist()})
    flat = parse({"instances": x.reshape(3, 64).tolist()})
    named = parse({"instances": [{"input_layer": row.tolist()} for row in x], "signature_name": "serving_default"})
    columnar = parse({"inputs": {"input_layer": x.tolist()}})
    for batch in (shaped, flat, named, columnar):
        assert batch.examples.dtype == np.float32 and batch.examples.shape == (3, 8, 8, 1)
        np.testing.assert_array_equal(batch.examples, x.astype(np.float32))
    assert not shaped.columnar and columnar.columnar
    ints = parse({"instances": [[1] * 64]}).examples
    assert ints.dtype == np.float32 and ints.sum() == 64


def test_every_bad_request_names_what_is_wrong_and_the_signature():
    one = [0.0] * 64
    assert "not JSON" in refused(b"{instances: [1]")
    assert "got list" in refused([one])
    assert '"instances" (row format) or "inputs"' in refused({"instance": [one]})
    assert "got keys 'instances', 'inputs'" in refused({"instances": [one], "inputs": [one]})
    assert "signature_name 'classify' is not served" in refused({"instances": [one], "signature_name": "classify"})
    assert '"instances" is empty' in refused({"instances": []})
    assert "must be a list of instances" in refused({"instances": 3})
    expected = "each instance is [8, 8, 1] (or its 64 values flat); the model's input is 'input_layer' float32 " \
               "[-1, 8, 8, 1]"
    for body, what in (({"instances": [[0.0] * 63]}, "an instance has shape [63]"),
                       ({"instances": [one, one[:10]]}, "not a regular array"),
                       ({"instances": [["0.5"] * 64]}, "hold strings"),
                       ({"instances": [[True] * 64]}, "hold true/false"),
                       ({"instances": [[None] * 64]}, "hold non-numbers")):
        message = refused(body)
        assert what in message and expected in message, message
    assert "named inputs must use the model's one input name 'input_layer', got ['x']" in \
        refused({"instances": [{"x": one}]})
    assert "101 instances in one request, more than serve.max_request_instances=100" in refused({"instances": [one] * 101})
    assert parse({"instances": [one] * 100}).examples.shape == (100, 8, 8, 1)   # the limit itself is allowed


def test_endpoints_follow_tf_serving_paths_and_refuse_others_with_their_status():
    assert endpoint("POST", "/v1/models/digits:predict", "digits").kind == "predict"
    assert endpoint("POST", "/v1/models/digits/versions/1:predict", "digits").kind == "predict"
    assert endpoint("GET", "/v1/models/digits", "digits").kind == "status"
    assert endpoint("GET", "/v1/models/digits/metadata", "digits").kind == "metadata"
    for method, path, status, words in (("POST", "/v1/models/cats:predict", 404, "Servable not found"),
                                        ("POST", "/v1/models/digits/versions/2:predict", 404, "version 1"),
                                        ("POST", "/v1/models/digits:classify", 404, "only :predict"),
                                        ("GET", "/v1/models/digits:predict", 405, "takes POST"),
                                        ("POST", "/v1/models/digits", 405, "takes GET"),
                                        ("GET", "/predict", 404, "POST /v1/models/digits:predict")):
        with pytest.raises(BadRequest) as caught:
            endpoint(method, path, "digits")
        assert caught.value.status == status and words in str(caught.value), (path, str(caught.value))


def test_answers_are_tf_serving_bodies_whose_numbers_read_back_to_the_same_float32():
    outputs = np.random.default_rng(1).random((2, 10)).astype(np.float32)
    for columnar, key in ((False, "predictions"), (True, "outputs")):
        body = json.loads(json.dumps(predict_body(outputs, columnar)))
        assert list(body) == [key]
        np.testing.assert_array_equal(np.array(body[key], dtype=np.float32), outputs)   # bit for bit
    sig = metadata_body("digits", DIGITS)["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["input_layer"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["input_layer"]["tensor_shape"]["dim"]] == ["-1", "8", "8", "1"]
    assert [d["size"] for d in sig["outputs"]["dense_2"]["tensor_shape"]["dim"]] == ["-1", "10"]


def test_serve_settings_are_checked_with_one_line_each():
    assert load_config(None, ["--serve.max_batch_size=8", "--serve.batch_wait_ms=2"]).serve.max_batch_size == 8
    for override, words in (("--serve.max_batch_size=0", "serve.max_batch_size must be >= 1"),
                            ("--serve.min_replicas=0", "serve.min_replicas must be >= 1"),
                            ("--serve.target_ongoing_requests=0", "serve.target_ongoing_requests must be > 0"),
                            ("--serve.replica_cpus=0", "serve.replica_cpus must be > 0"),
                            ("--serve.max_request_instances=0", "serve.max_request_instances must be >= 1"),
                            ("--serve.batch_wait_ms=-1", "serve.batch_wait_ms must be >= 0"),
                            ("--serve.max_batch_sise=8", "did you mean 'max_batch_size'")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="serve.max_replicas=2 is below serve.min_replicas=3"):
        load_config(None, ["--serve.min_replicas=3", "--serve.max_replicas=2"])


def test_replicas_fill_the_cores_unless_more_are_asked_for(tmp_path):
    run = _run_dir(tmp_path / "digits")
    cfg = load_config(None, ["--serve.replica_cpus=0.5"]).serve
    settings = settings_for(str(run), cfg)
    assert max_replicas(settings, cpus=2) == 4                          # 2 cores / 0.5 CPU
    assert max_replicas(settings, cpus=0.25) == 1                       # at least min_replicas
    asked = settings_for(str(run), load_config(None, ["--serve.max_replicas=6"]).serve)
    assert max_replicas(asked, cpus=2) == 6


def test_model_argument_names_a_run_a_keras_file_or_a_saved_model(tmp_path):
    run = _run_dir(tmp_path / "digits")
    assert settings_for(str(run), load_config().serve).source.path == str(run / "model.keras")
    assert default_name(str(run)) == "digits" and default_name(str(run / "model.keras")) == "digits"
    saved = run / "export" / "saved_model"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"")
    assert settings_for(str(saved), load_config().serve).source.kind == "saved_model"
    assert default_name(str(saved)) == "digits"
    (run / "model.keras").unlink()
    with pytest.raises(UserError, match="has no model.keras"):
        settings_for(str(run), load_config().serve)
    with pytest.raises(UserError, match="does not exist"):
        settings_for(str(tmp_path / "nowhere"), load_config().serve)
    with pytest.raises(UserError, match="trained without pipeline stages|holds no checkpoint"):
        settings_for(str(run), load_config().serve, stages=2)
    ckpt = run / "checkpoints" / "ckpt-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"signature": {"pipeline": {"stages": 2, "first_layers": ["a", "b"]},
                                                              "tensor": {"degree": 2, "plan": {}}}}))
    with pytest.raises(UserError, match=r"^--stages 2: .* was trained with layers split over 2 ranks "
                                        r"\(parallel.tensor_parallel\).*serve it without --stages"):
        settings_for(str(run), load_config().serve, stages=2)


def test_a_port_in_use_is_refused_before_anything_starts():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)


def test_without_ray_the_command_names_the_extra_to_install(tmp_path):
    import socket
    run = _run_dir(tmp_path / "digits")
    with socket.socket() as probe:   # a port that is free
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys; sys.modules['ray'] = None\n"   # as if the [serve] extra were not installed
            "from hvdtrain.cli import main; sys.exit(main(['serve', sys.argv[1], '--port', sys.argv[2]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(run), str(port)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'hvdtrain serve needs ray, which is not installed here: pip install "hvdtrain[serve]"' in proc.stderr


def _run_dir(path):
    """What `hvdtrain serve` looks for in a run directory (files only: nothing here loads them)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("{}\n")
    (path / "model.keras").write_bytes(b"")
    return path
