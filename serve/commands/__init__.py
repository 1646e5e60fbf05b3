"""Subcommands of ``covspec``; each module exposes a ``Command`` and is listed here."""

from serve.commands.adapters import TRAIN_ADAPTER
from serve.commands.base import Command
from serve.commands.generate import GENERATE
from serve.commands.learned import ADAPTERS
from serve.commands.model_tools import CHECK_MODEL, MAKE_RANDOM_CHECKPOINT
from serve.commands.serve_cmd import KEYS, SERVE
from serve.commands.tiny import EVAL_TINY, SHAPES_SAMPLE, TRAIN_TINY

COMMANDS: list[Command] = [
    CHECK_MODEL, MAKE_RANDOM_CHECKPOINT, TRAIN_TINY, SHAPES_SAMPLE, EVAL_TINY, GENERATE, TRAIN_ADAPTER,
    SERVE, KEYS, ADAPTERS,
]  # fmt: skip

__all__ = ["COMMANDS", "Command"]
