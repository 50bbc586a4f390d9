"""`python -m finetune.predict`: see :mod:`finetune.cli.predict`."""

from finetune.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
