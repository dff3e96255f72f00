"""The umbrella ``veil`` command: dispatches to each room's subcommands."""
