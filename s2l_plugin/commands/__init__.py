"""One module per ``s2l`` subcommand; each defines ``register(subparsers)``. Keep them import-light."""
