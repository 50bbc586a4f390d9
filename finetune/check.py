"""`python -m finetune.check`: see :mod:`finetune.cli.check`."""

from finetune.cli.check import main

if __name__ == "__main__":
    raise SystemExit(main())
