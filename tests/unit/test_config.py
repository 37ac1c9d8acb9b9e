import dataclasses

import pytest
import yaml

from conftest import REPO
from hvdtrain.config import Config, check_world, describe_fields, load_config, parse_override
from hvdtrain.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_digits_job_and_round_trip_through_yaml(tmp_path):
    cfg = Config()
    assert cfg.data.source == "digits" and cfg.trainer.global_batch_size == 64
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_file_then_overrides_win_in_that_order(tmp_path):
    path = write(tmp_path, "trainer:\n  epochs: 7\n  global_batch_size: 32\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["--trainer.epochs=3", "--data.input_shape=[4,4,1]", "--data.source=synthetic"])
    assert (cfg.trainer.epochs, cfg.trainer.global_batch_size, cfg.optim.lr) == (3, 32, 0.1)
    assert cfg.data.input_shape == (4, 4, 1)


def test_every_shipped_config_loads_with_the_values_it_states():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"digits", "synthetic", "images", "resnet50-synthetic"}
    for path in paths:
        loaded = load_config(str(path)).to_dict()
        for section, values in yaml.safe_load(path.read_text()).items():
            for key, value in values.items():
                assert loaded[section][key] == value, (path.name, section, key)


@pytest.mark.parametrize("text, message", [
    ("trainer:\n  epoch: 3\n", "unknown config key 'trainer.epoch' (did you mean 'epochs'?)"),
    ("trainr:\n  epochs: 3\n", "unknown config section 'trainr' (did you mean 'trainer'?)"),
    ("trainer:\n  epochs: three\n", "trainer.epochs must be an integer, got 'three'"),
    ("trainer:\n  epochs: 2.5\n", "trainer.epochs must be an integer"),
    ("runtime:\n  deterministic: 1\n", "runtime.deterministic must be true or false"),
    ("optim:\n  name: adamw\n", "optim.name must be one of sgd | adam | rmsprop, got 'adamw' (did you mean 'adam'?)"),
    ("optim:\n  lr: -1\n", "optim.lr must be > 0"),
    ("data:\n  source: tfrecord\n", "data.path is required when data.source=tfrecord"),
    ("data:\n  source: synthetic\n", "data.input_shape is required when data.source=synthetic"),
    ("data:\n  source: tfds\n  path: /d\n", "data.tfds_name is required when data.source=tfds"),
    ("data:\n  source: images\n  path: /d\n  task: regression\n", "data.source=images has class labels"),
    ("data:\n  image_size: [32]\n", "data.image_size must be [height, width]"),
    ("runtime:\n  precision: float16\n", "runtime.precision must be one of float32 | mixed_float16 | mixed_bfloat16"),
    ("model:\n  weights: /no/such.h5\n", "model.weights file not found: /no/such.h5"),
    ("- just\n- a list\n", "must hold a mapping of sections"),
    ("trainer: 5\n", "config section 'trainer' must be a mapping"),
    ("parallel:\n  shard_state: 3\n", "parallel.shard_state must be 0 (whole state), 1 (sharded optimizer state) or 2 "
                                      "(and sharded gradients), got 3"),
    ("parallel:\n  shard_state: 1\ntrainer:\n  sync: local_sgd\n", "parallel.shard_state=1 shards the state of "
     "every-step averaging; trainer.sync=local_sgd keeps whole models apart between averages: set "
     "parallel.shard_state=0"),
    ("parallel:\n  shard_state: 2\ntrainer:\n  sync: fedavg\n", "parallel.shard_state=2 shards the state of "
     "every-step averaging; trainer.sync=fedavg keeps whole models apart"),
    ("parallel:\n  shard_state: 1\ntrainer:\n  elastic: true\n", "parallel.shard_state > 0 cannot be elastic"),
    ("parallel:\n  shard_state: 1\nruntime:\n  bucket_mb: 4\n", "runtime.bucket_mb applies to stage 0's all-reduce"),
])
def test_each_bad_config_gives_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.agreed   # every rank reads the same config: rank 0 alone prints it


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"is not valid YAML at line 3, column 11: mapping values are not allowed"):
        load_config(write(tmp_path, "trainer:\n  epochs: 3\n   run_dir: x\n"))


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="write it as --section.key=value"):
        parse_override("--epochs")


def test_override_values_are_parsed_as_yaml():
    assert parse_override("--model.hidden=[8, 4]") == ("model", "hidden", [8, 4])
    assert parse_override("trainer.tensorboard=false") == ("trainer", "tensorboard", False)


def test_global_batch_must_divide_by_ranks():
    cfg = load_config(None, ["--trainer.global_batch_size=10"])
    check_world(cfg, 2)
    with pytest.raises(UserError, match="not divisible by the 3 ranks; use a multiple of 3, e.g. 9 or 12"):
        check_world(cfg, 3)


def test_expected_ranks_refuses_a_run_without_the_launcher():
    cfg = load_config(None, ["--runtime.expected_ranks=2"])
    with pytest.raises(UserError, match=r"expects 2 ranks .* but 1 is running; launch with `horovodrun -np 2"):
        check_world(cfg, 1)
    with pytest.raises(UserError, match=r"the config expects 1 rank \(runtime.expected_ranks\) but 2 are running"):
        check_world(load_config(None, ["--runtime.expected_ranks=1"]), 2)


def test_frozen_and_replace():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.epochs = 3
    assert cfg.replace(trainer={"epochs": 3}).trainer.epochs == 3 and cfg.trainer.epochs == 30


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
    assert yaml.safe_load(Config().to_yaml())["trainer"]["run_dir"] == "runs/digits"




def test_communication_settings_reach_horovod_and_openmpi_by_their_names_and_the_environment_wins(monkeypatch):
    from hvdtrain.backend import comm_environment
    from hvdtrain.config import RuntimeConfig
    names = ("HOROVOD_WAKE_ON_ENQUEUE", "HOROVOD_IDLE_CYCLE_TIME", "HOROVOD_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle")
    for name in (*names, "HOROVOD_ELASTIC"):
        monkeypatch.delenv(name, raising=False)
    wanted = comm_environment(RuntimeConfig(cycle_time_ms=2.5, idle_cycle_time_ms=7))
    assert [wanted[name] for name in names] == ["1", "7", "2.5", "1"]
    off = comm_environment(RuntimeConfig(wake_on_enqueue=False, mpi_yield_when_idle=False))
    assert not {"HOROVOD_WAKE_ON_ENQUEUE", "HOROVOD_IDLE_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle"} & set(off)
    monkeypatch.setenv("HOROVOD_WAKE_ON_ENQUEUE", "0")   # a job script's choice
    assert comm_environment(RuntimeConfig())["HOROVOD_WAKE_ON_ENQUEUE"] == "0"


def test_tensorflow_thread_spinning_is_off_unless_asked_for():
    import subprocess
    import sys

    from conftest import env
    code = ("import sys\nfrom hvdtrain import runtime\nfrom hvdtrain.config import RuntimeConfig\n"
            "runtime.configure(RuntimeConfig(tf_thread_spinning=sys.argv[1] == 'on'), 1)\n"
            "import tensorflow as tf\nfrom tensorflow.python.eager import context\n"
            "tf.constant(1.0) + 1.0   # the context starts with its config\n"
            "print(context.context().config.experimental.disable_thread_spinning)")
    got = [subprocess.run([sys.executable, "-c", code, spin], env=env(), capture_output=True, text=True, timeout=120)
           for spin in ("off", "on")]
    assert [p.stdout.strip().splitlines()[-1] for p in got] == ["True", "False"], [p.stderr for p in got]
