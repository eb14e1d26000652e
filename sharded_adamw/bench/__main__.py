"""``python -m sharded_adamw.bench`` (under torchrun for several ranks): the benchmark's command
line."""

from .command import main

main()
