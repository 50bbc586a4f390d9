"""The typed config: schema, checks at the door, a run's identity.

Importing the package registers the schema in Hydra's ConfigStore (conf/config.yaml starts from it).
"""

from finetune.config.schema import register

register()
