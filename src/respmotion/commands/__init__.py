"""CLI layer: one module per subcommand; they call the stages, never the other way round."""
