"""The `instantid` command (console entry point): the core library's commands plus the batch job."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
