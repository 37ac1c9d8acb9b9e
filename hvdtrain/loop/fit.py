"""Keras's fit, driven by the loop controller: `FitHooks` adapts fit's callback hooks to the controller's methods,
and `fit_segments` runs fit from a session's position to its end in whole epochs."""
from __future__ import annotations

import keras


class FitHooks(keras.callbacks.Callback):
    """What Keras calls: every hook goes to the controller, which runs the rest in its order."""

    def __init__(self, controller):
        super().__init__()
        self.controller = controller

    def set_model(self, model):
        super().set_model(model)
        self.controller.attach(model)

    def set_params(self, params):
        super().set_params(params)
        self.controller.attach(self.model, params)

    def on_train_begin(self, logs=None):
        self.controller.train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.controller.epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.controller.step_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.controller.step_end(batch, logs):
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.controller.epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        self.controller.train_end(logs)

    def on_test_begin(self, logs=None):
        self.controller.test_hook("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self.controller.test_hook("on_test_end", logs)

    def on_test_batch_begin(self, batch, logs=None):
        self.controller.test_hook("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self.controller.test_hook("on_test_batch_end", batch, logs)


def fit_segments(model, batches_from, session, callbacks, verbose: int = 0, diagnose=None, **fit_kwargs) -> None:
    """model.fit from the session's start to the end, in whole epochs: first the rest of a partly trained epoch (a
    resume after a mid-epoch stop), then the remaining epochs, so every later epoch ends where it would have without
    the stop. `batches_from(first_epoch, epochs, skip)` gives the per-rank stream. Both entrances fit through here."""
    p, steps, epochs = session.progress, session.progress.steps_per_epoch, session.progress.epochs
    fit = dict(callbacks=callbacks, verbose=verbose, shuffle=False, **fit_kwargs)
    with session.guard(diagnose):
        start = p.position
        if start.step_in_epoch and start.epoch < epochs:
            model.fit(batches_from(start.epoch, start.epoch + 1, start.step_in_epoch), epochs=start.epoch + 1,
                      initial_epoch=start.epoch, steps_per_epoch=steps - start.step_in_epoch, **fit)
            if p.stop_reason:
                return
        start = p.position
        if start.epoch < epochs:
            model.fit(batches_from(start.epoch, epochs, 0), epochs=epochs, initial_epoch=start.epoch,
                      steps_per_epoch=steps, **fit)
