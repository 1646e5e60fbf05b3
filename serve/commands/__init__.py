"""Subcommands of ``covspec``; each module exposes a ``Command`` and is listed here."""

from serve.commands.base import Command
from serve.commands.model_tools import CHECK_MODEL, MAKE_RANDOM_CHECKPOINT

COMMANDS: list[Command] = [CHECK_MODEL, MAKE_RANDOM_CHECKPOINT]

__all__ = ["COMMANDS", "Command"]
