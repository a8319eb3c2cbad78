"""Datasets for training and benchmarks: offline ``digits`` and ``synthetic``, CIFAR-10/100, ImageFolder.

    train, test, info = actlab.data.build_datasets("digits")
    train_loader, test_loader = actlab.data.make_loaders(train, test, batch_size=128)
"""
from .datasets import DATASETS, DatasetInfo, build_datasets, list_datasets
from .loaders import make_loaders

__all__ = ["DATASETS", "DatasetInfo", "build_datasets", "list_datasets", "make_loaders"]
