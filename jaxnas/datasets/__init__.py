"""Image datasets for real training: host loading, deterministic splits, jittable preprocessing."""

from jaxnas.datasets.loaders import (DATASETS, FASHION_MNIST_DIR, Dataset, DatasetError,
                                     default_augment, load_cifar10, load_cifar100, load_dataset,
                                     load_fashion_mnist, load_idx_dataset, load_mnist,
                                     make_preprocess, normalize, random_crop_flip, read_idx,
                                     train_val_split)

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "Dataset", "DatasetError", "default_augment",
           "load_cifar10", "load_cifar100", "load_dataset", "load_fashion_mnist",
           "load_idx_dataset", "load_mnist", "make_preprocess", "normalize", "random_crop_flip",
           "read_idx", "train_val_split"]
