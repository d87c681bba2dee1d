"""`python -m moecompress …` (what `torchrun -m moecompress …` runs): the same entry as the console script."""

from moecompress.cli import main

main()
