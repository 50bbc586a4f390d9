"""One run, end to end: the train function, the run directory, resume, summary.json."""
