"""`python -m finetune.compare`: see :mod:`finetune.cli.compare`."""

from finetune.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
