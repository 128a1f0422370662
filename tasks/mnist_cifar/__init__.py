"""MNIST and CIFAR-10 (torchvision datasets) classification."""
