"""The typed config: schema, checks at the door, a run's identity."""
