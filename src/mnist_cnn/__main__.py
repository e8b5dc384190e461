"""`python -m mnist_cnn` works like the `mnist-cnn` command."""

from mnist_cnn.cli import main

raise SystemExit(main())
