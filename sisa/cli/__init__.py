"""Layer 10, the ``sisa`` command line: one module per group of commands, plus formatting and logging."""
