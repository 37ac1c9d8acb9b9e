"""Rank 0's progress display: launchers (mpirun, horovodrun) tag a rank's output per write, so a line written in
pieces gets a stray tag glued to it; federated averaging's round lines did (they were printed with print(), the text
and its newline in two writes). Every line is now one write, whatever the unit."""
from hvdtrain.loop.display import ProgressLogger
from hvdtrain.loop.progress import Progress


class Recorded:
    def __init__(self):
        self.writes = []

    def isatty(self):
        return False

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_every_line_of_a_federated_run_is_one_write_naming_its_round():
    stream = Recorded()
    logger = ProgressLogger("epoch", Progress(steps_per_epoch=1, epochs=60), stream=stream, unit="round")
    for r in range(3):
        logger.on_epoch_begin(r)
        logger.on_train_batch_end(0, {"loss": 0.5})
        logger.on_epoch_end(r, {"loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.9, "samples_per_sec": 1234.0})
    assert len(stream.writes) == 3
    for r, text in enumerate(stream.writes):
        assert text.startswith(f"round {r + 1}/60  loss 0.5000  val_loss 0.2500  val_accuracy 0.9000  1,234 samples/s")
        assert text.endswith("s\n") and text.count("\n") == 1
