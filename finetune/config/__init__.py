"""The typed config: schema, checks at the door, a run's identity.

Importing :mod:`finetune.config.schema` registers the schema in Hydra's ConfigStore (conf/config.yaml starts from
it). The package itself imports nothing: the schema reads Lightning's Trainer signature, and the commands that
only read summaries or refuse a word (compare, report's errors) should not pay that import. Whoever composes
imports the schema first (the entry points, the run modules, tests/conftest.py).
"""
