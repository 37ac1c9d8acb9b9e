"""The Keras-API example runs under horovodrun and evaluates exactly over both ranks' shards."""
import re

from conftest import REPO, horovodrun, output


def test_keras_api_example_trains_on_two_ranks():
    proc = horovodrun(2, ["python", str(REPO / "examples/keras_digits.py"), "--epochs", "15"], "gloo")
    assert proc.returncode == 0, output(proc)
    found = re.findall(r"test accuracy ([0-9.]+) on (\d+) examples from (\d+) ranks", proc.stdout)
    assert len(found) == 1, "exactly one rank (rank 0) reports"
    accuracy, examples, ranks = found[0]
    assert int(examples) == 360 and int(ranks) == 2
    assert float(accuracy) >= 0.9
