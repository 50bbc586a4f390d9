"""`python -m finetune.report`: see :mod:`finetune.cli.report`."""

from finetune.cli.report import main

if __name__ == "__main__":
    raise SystemExit(main())
