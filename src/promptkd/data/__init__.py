"""Datasets, splits (base/novel, few-shot, unlabelled streams), transforms and loaders."""
