"""Print the resolved config (defaults <- YAML file <- --section.key=value overrides), or every key's reference."""
from __future__ import annotations

HELP = "print the resolved config (defaults <- file <- overrides)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--reference", action="store_true", help="list every key, its default and what it does")


def run(args, overrides) -> int:
    from hvdtrain.config import describe_fields, load_config
    if args.reference:
        for key, default, doc in describe_fields():
            print(f"{key:34} {default:16} {doc}")
        return 0
    print(load_config(args.config, overrides).to_yaml(), end="")
    return 0
