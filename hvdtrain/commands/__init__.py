"""Every `hvdtrain` subcommand, one module each: HELP, add_arguments(parser), run(args, overrides) -> exit code.

Modules import TensorFlow and Horovod lazily (inside run), so `hvdtrain --help` stays fast.
"""
COMMANDS = {
    "train": "hvdtrain.commands.train",
    "evaluate": "hvdtrain.commands.evaluate",
    "predict": "hvdtrain.commands.predict",
    "export": "hvdtrain.commands.export",
    "serve": "hvdtrain.commands.serve",
    "sweep": "hvdtrain.commands.sweep",
    "slurm": "hvdtrain.commands.slurm",
    "config": "hvdtrain.commands.config",
    "doctor": "hvdtrain.commands.doctor",
    "bench": "hvdtrain.commands.bench",
}
