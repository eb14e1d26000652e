"""``python -m benchmarks`` (under torchrun for several ranks): the benchmark's command
line."""

from .command import main

main()
