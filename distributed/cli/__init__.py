"""Command lines: ``dcenter`` and ``dworker``."""
