"""Commands beside training: check, predict, export, report, compare."""
