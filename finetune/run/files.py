"""The names of the files a run folder holds: one place for the code that writes them and the code that only
reads them (compare), which so imports nothing heavy."""

CONFIG_NAME = "resolved_config.yaml"  # the run's config, resolved: written before training
SUMMARY_NAME = "summary.json"  # written last: its presence means the run finished
SPLITS_NAME = "splits.csv"  # every sample's path, split, label and content hash
