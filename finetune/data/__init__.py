"""Datasets, transforms and the datamodule. The data side never knows the strategy."""
