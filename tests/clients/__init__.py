"""Training programs written the way users of each stack write them, run under ``torchrun``
by ``tests/test_stacks.py`` with ``--optimizer sharded`` and with ``--optimizer adamw``."""
