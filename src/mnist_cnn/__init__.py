"""mnist-cnn: train, evaluate and explain a convolutional MNIST digit classifier."""

__version__ = "0.1.0"
