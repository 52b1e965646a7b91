"""The ``lightning-unlearn`` command (= ``python -m lightning_unlearn``): a thin dispatcher over the commands.

Each command lives in its own module; this one only maps command words to them. No package module imports it, so the
dispatcher sits on top of the import graph and the commands' modules never import each other through it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lightning_unlearn import cli, demo, sweep
from lightning_unlearn.console import quiet

#: command → (function taking the remaining arguments, one-line description)
COMMANDS: dict[str, tuple[Callable[[list[str]], Any], str]] = {
    "train": (cli.train_main, "train a model (LightningCLI: fit, test, ...), by default a classifier on poisoned data"),
    "unlearn": (cli.unlearn_main, "unlearn a training run's poisoned samples, write report.json"),
    "profile": (cli.profile_main, "the Hessian-diagonal profile of a trained checkpoint"),
    "sweep": (sweep.main, "update each weight layer alone: improvement vs sharpness"),
    "demo": (demo.main, "the whole pipeline on real MNIST, with a results table"),
    "history": (cli.history_main, "print the chain of unlearning requests recorded in an unlearned checkpoint"),
}


def usage() -> str:
    """The command's help: every command word with its description."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {description}" for name, (_, description) in COMMANDS.items()]
    return (
        f"usage: lightning-unlearn {{{','.join(COMMANDS)}}} ...\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nRun `lightning-unlearn <command> --help` for a command's options."
    )


def run(argv: list[str]) -> Any:
    """Run the command ``argv[0]`` names with the rest of ``argv`` as its arguments; returns what it returns (a
    report, a history, a path)."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(
            f"lightning-unlearn: the first argument must be one of {{{', '.join(COMMANDS)}}}, got {argv[:1]}\n\n"
            + usage()
        )
    command, _ = COMMANDS[argv[0]]
    # `sys.argv` is left as it is: under `strategy="ddp"` Lightning starts the other ranks by running it again
    with quiet():
        return command(argv[1:])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-unlearn`` console script, ``python -m lightning_unlearn``, ``train.py`` and
    ``unlearn.py``: ``argv[0]`` names the command, the rest are its arguments (:func:`run`; nothing is returned, so
    the console script's exit status is 0 on success)."""
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
