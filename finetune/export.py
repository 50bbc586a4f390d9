"""`python -m finetune.export`: see :mod:`finetune.cli.export`."""

from finetune.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
