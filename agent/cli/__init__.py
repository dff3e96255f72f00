"""Command-line entry points of the node: ``veil agent`` subcommands and ``veilctl``."""
