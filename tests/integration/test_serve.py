"""`hvdtrain serve` as users run it, on one digits run trained with 2 pipeline stages (MPI): its model.keras served
whole (TensorFlow Serving's API, predictions equal to model.keras's, batching, every bad request, a port in use,
autoscaling 1 -> 2 -> 1 under load, a killed replica replaced, SIGTERM), then the same run served as 2 chained stage
deployments (equal to the whole model, each replica holding only its stage's weights, Ctrl-C to the process group).
One server at a time, on loopback; each server's processes are found by PID and must all be gone after it stops."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import psutil
import pytest

from conftest import BIN, REPO, env, horovodrun, hvdtrain, output, wait_for

START_TIMEOUT = 300   # Ray, then TensorFlow and the model in each replica, on a shared 2-core machine


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "digits"
    proc = horovodrun(2, ["hvdtrain", "train", "--config", str(REPO / "configs/digits.yaml"),
                          f"--trainer.run_dir={run}", "--parallel.pipeline_stages=2", "--trainer.epochs=2",
                          "--trainer.progress=none", "--trainer.tensorboard=false"], launcher="mpi")
    assert proc.returncode == 0, output(proc)
    return run


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return (load_digits().images / 16.0).astype(np.float32)[..., None][:64]   # [64, 8, 8, 1]


@pytest.fixture(scope="module")
def keras_model(run):
    from hvdtrain.runtime import import_tensorflow
    import_tensorflow()
    import keras
    return keras.saving.load_model(run / "model.keras", compile=False)


def test_a_replica_loads_model_keras_and_its_saved_model_export_alike(run, keras_model, digits, tmp_path):
    """What a replica holds, loaded here without Ray: model.keras (Keras's compiled predict: model.predict's
    numbers) and the SavedModel that `hvdtrain export` writes with the same Keras call (its serve function); a file
    that is no model is refused in one line (the server prints it as the replicas' reason not to start)."""
    from hvdtrain.errors import UserError
    from hvdtrain.serve.model import Source, load
    keras_model.export(str(tmp_path / "saved_model"), format="tf_saved_model", verbose=False)
    expected = keras_model.predict(digits[:9], batch_size=9, verbose=0)
    whole = load(Source("keras", str(run / "model.keras")), threads=1)
    exported = load(Source("saved_model", str(tmp_path / "saved_model")), threads=1)
    np.testing.assert_array_equal(whole(digits[:9]), expected)
    np.testing.assert_allclose(exported(digits[:9]), expected, rtol=1e-5, atol=1e-5)
    assert whole.signature.input == exported.signature.input
    assert whole.signature.output.shape == exported.signature.output.shape == (10,)
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot load .*broken.keras .*; pass a model.keras written by hvdtrain train"):
        load(Source("keras", str(tmp_path / "broken.keras")), threads=1)


class Server:
    """`hvdtrain serve ...` in a session of its own (as a terminal would run it), with a free loopback port."""

    def __init__(self, args: list, log_path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log_path = log_path
        self.proc = subprocess.Popen([str(BIN / "hvdtrain"), "serve", *map(str, args), "--port", str(self.port)],
                                     cwd=REPO, env=env(), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_for(self._ready, START_TIMEOUT, "the server to answer /readyz")
        except BaseException:
            print(self.log())
            self.kill()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log()}"
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return open(self.log_path).read()

    def get(self, path: str):
        return self.call("GET", path)

    def post(self, path: str, body, timeout: float = 150):
        return self.call("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), timeout)

    def call(self, method: str, path: str, data=None, timeout: float = 30):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, _json(answer.read()), answer.headers
        except urllib.error.HTTPError as answer:
            return answer.code, _json(answer.read()), answer.headers

    def processes(self) -> list:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def replicas(self, deployment: str) -> list:
        """The replica processes of a deployment, by the title Ray gives them."""
        found = []
        for p in self.processes():
            try:
                if f"ServeReplica:digits:{deployment}" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self, how) -> str:
        """Stop it with `how(pid)`; its exit code must be 0 and every process it had must be gone."""
        processes = self.processes()
        assert len(processes) >= 5, processes   # Ray's GCS, raylet, ..., the replicas: they are found
        how(self.proc.pid)
        assert self.proc.wait(timeout=120) == 0, self.log()
        left = wait_for_gone(processes)
        assert not left, f"left behind: {left}\n{self.log()}"
        return self.log()

    def kill(self) -> None:
        """Teardown after a failure: everything, by PID."""
        for p in [psutil.Process(self.proc.pid), *self.processes()] if self.proc.poll() is None else []:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _json(body: bytes):
    """The answer's JSON (Ray's proxy answers in plain text until the application is deployed)."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def wait_for_gone(processes, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def whole(run, tmp_path_factory):
    # Short autoscaler delays and a 20 ms batch window, so the test sees scaling and batching in seconds.
    server = Server([run, "--serve.upscale_delay_s=1", "--serve.downscale_delay_s=4", "--serve.batch_wait_ms=20",
                     "--serve.max_request_instances=50"], tmp_path_factory.mktemp("whole") / "serve.log")
    yield server
    server.kill()


def test_status_metadata_and_health_follow_tf_serving(whole, keras_model):
    assert whole.get("/v1/models/digits")[:2] == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    status, meta, _ = whole.get("/v1/models/digits/metadata")
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and meta["model_spec"]["name"] == "digits"
    (name, spec), = signature["inputs"].items()
    assert name == keras_model.inputs[0].name and spec["dtype"] == "DT_FLOAT"
    assert [int(d["size"]) for d in spec["tensor_shape"]["dim"]] == [-1, 8, 8, 1]
    (_, out), = signature["outputs"].items()
    assert [int(d["size"]) for d in out["tensor_shape"]["dim"]] == [-1, 10]
    assert whole.get("/healthz")[:2] == (200, {"status": "alive"})
    assert whole.get("/readyz")[:2] == (200, {"status": "ready"})
    assert whole.get("/v1/models/cats")[0] == 404


def test_predictions_equal_model_keras_on_the_same_batch(whole, keras_model, digits):
    """One request at a time: the replica's model call holds exactly the request's rows, as model.predict's batch
    does, so float32 results are equal bit for bit (row format, flat instances, columnar format)."""
    for rows in (digits[:1], digits[1:21], digits[21:64]):
        expected = keras_model.predict(rows, batch_size=len(rows), verbose=0)
        status, body, headers = whole.post("/v1/models/digits:predict", {"instances": rows.tolist()})
        assert status == 200 and headers["x-hvdtrain-batch"] == "1", body
        np.testing.assert_array_equal(np.array(body["predictions"], dtype=np.float32), expected)
    flat = whole.post("/v1/models/digits:predict", {"instances": digits[:5].reshape(5, 64).tolist()})[1]
    columnar = whole.post("/v1/models/digits:predict", {"inputs": digits[:5].tolist()})[1]
    expected = keras_model.predict(digits[:5], batch_size=5, verbose=0)
    np.testing.assert_array_equal(np.array(flat["predictions"], dtype=np.float32), expected)
    np.testing.assert_array_equal(np.array(columnar["outputs"], dtype=np.float32), expected)


def test_concurrent_requests_are_scored_together_and_agree(whole, keras_model, digits):
    """16 single-instance requests at once: the replica scores several in one model call (its count, per answer),
    and each answer equals the model's within the documented tolerance (rows scored beside other rows), same class."""
    answers, start = {}, threading.Barrier(16)

    def ask(i):
        start.wait()
        answers[i] = whole.post("/v1/models/digits:predict", {"instances": [digits[i].tolist()]})
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(status == 200 for status, _, _ in answers.values()), answers
    batched = Counter(int(headers["x-hvdtrain-batch"]) for _, _, headers in answers.values())
    assert max(batched) > 1, batched
    # Only these 16 requests were in flight: a model call of b requests answered b of them.
    assert all(count % size == 0 for size, count in batched.items()), batched
    got = np.array([answers[i][1]["predictions"][0] for i in range(16)], dtype=np.float32)
    alone = np.concatenate([keras_model.predict(digits[i:i + 1], batch_size=1, verbose=0) for i in range(16)])
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)   # docs/serving.md, "What is exact"
    assert (got.argmax(1) == alone.argmax(1)).all()


def test_bad_requests_get_400_with_what_is_wrong_and_serving_goes_on(whole, digits):
    one = digits[0].reshape(64).tolist()
    cases = [(b"{not json", "not JSON"),
             ({"instance": [one]}, '"instances" (row format) or "inputs" (columnar format)'),
             ({"instances": [one[:63]]}, "an instance has shape [63]; each instance is [8, 8, 1] (or its 64 values "
                                         "flat); the model's input is"),
             ({"instances": [["x"] * 64]}, "hold strings; the model takes float32 numbers"),
             ({"instances": []}, '"instances" is empty'),
             ({"instances": [one] * 51}, "51 instances in one request, more than serve.max_request_instances=50")]
    for body, words in cases:
        status, answer, _ = whole.post("/v1/models/digits:predict", body)
        assert status == 400 and words in answer["error"], (body if isinstance(body, bytes) else list(body), answer)
        assert whole.post("/v1/models/digits:predict", {"instances": [one]})[0] == 200


def test_a_second_server_on_the_same_port_is_refused_in_one_line(whole, run):
    proc = hvdtrain(["serve", str(run), "--port", str(whole.port)], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hvdtrain: error: port {whole.port} on 127.0.0.1 is in use (another server?); " \
                                  "choose another with --port, or stop the one using it"


def test_the_autoscaler_adds_a_replica_under_load_and_removes_it_after(whole, digits):
    wait_for(lambda: len(whole.replicas("Model")) == 1, 120, "one Model replica before the load")
    stop, statuses, answered_by = threading.Event(), Counter(), set()
    body = {"instances": [digits[0].tolist()]}

    def client():
        while not stop.is_set():
            status, _, headers = whole.post("/v1/models/digits:predict", body)
            statuses[status] += 1
            answered_by.add(headers.get("x-hvdtrain-replica"))
    clients = [threading.Thread(target=client) for _ in range(12)]
    [c.start() for c in clients]
    try:
        wait_for(lambda: len(whole.replicas("Model")) >= 2 and len(answered_by) >= 2, 180,
                 f"a second Model replica answering under load:\n{whole.log()}")
    finally:
        stop.set()
        [c.join() for c in clients]
    assert set(statuses) == {200}, statuses
    wait_for(lambda: len(whole.replicas("Model")) == 1, 120, f"back to one Model replica:\n{whole.log()}")
    assert "Model: 2 replicas running (was 1)" in whole.log() and "Model: 1 replica running (was 2)" in whole.log()


def test_a_killed_replica_is_replaced_and_the_next_requests_succeed(whole, digits):
    body = {"instances": [digits[0].tolist()]}
    wait_for(lambda: len(whole.replicas("Model")) == 1, 120, "one Model replica")
    (replica,) = whole.replicas("Model")
    _, before, headers = whole.post("/v1/models/digits:predict", body)
    replica.kill()   # kill -9
    for _ in range(3):
        status, answer, after = whole.post("/v1/models/digits:predict", body)
        assert status == 200 and answer == before, answer
        assert after["x-hvdtrain-replica"] != headers["x-hvdtrain-replica"]
    assert [p.pid for p in whole.replicas("Model")] != [replica.pid]


def test_sigterm_stops_the_server_and_every_ray_process(whole):
    log = whole.stop(lambda pid: os.kill(pid, signal.SIGTERM))
    assert "stopped: no Ray process of this server is left" in log


@pytest.fixture(scope="module")
def staged(run, tmp_path_factory):
    server = Server([run, "--stages", "2"], tmp_path_factory.mktemp("staged") / "serve.log")
    yield server
    server.kill()


def test_two_stage_deployments_equal_the_whole_model_each_holding_its_stage(staged, run, keras_model, digits):
    for rows in (digits[:7], digits[7:64]):
        status, body, headers = staged.post("/v1/models/digits:predict", {"instances": rows.tolist()})
        assert status == 200 and headers["x-hvdtrain-batch"] == "1,1"
        np.testing.assert_array_equal(np.array(body["predictions"], dtype=np.float32),
                                      keras_model.predict(rows, batch_size=len(rows), verbose=0))
    # The parameters of each stage's layers, from model.keras and the split the checkpoint records.
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    first = json.loads((ckpt / "meta.json").read_text())["signature"]["pipeline"]["first_layers"]
    names = [layer.name for layer in keras_model.layers]
    cut = names.index(first[1])
    expected = [sum(layer.count_params() for layer in keras_model.layers[:cut]),
                sum(layer.count_params() for layer in keras_model.layers[cut:])]
    held = staged.get("/stages")[1]["stages"]
    assert [(s["deployment"], s["held_parameters"]) for s in held] == list(zip(["Stage1", "Stage2"], expected))
    assert len(staged.replicas("Stage1")) == len(staged.replicas("Stage2")) == 1


def test_ctrl_c_stops_the_staged_server_and_every_ray_process(staged):
    log = staged.stop(lambda pid: os.killpg(pid, signal.SIGINT))   # a terminal's Ctrl-C: the whole process group
    assert "stopping ..." in log and "stopped: no Ray process of this server is left" in log
