"""Command-line entry points: ``veil`` (run the components) and ``veilctl`` (inspect a node)."""
