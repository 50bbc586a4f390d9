"""`python -m finetune [overrides]`: train one run (or a sweep with -m) from the Hydra config."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune import config_dir
from finetune.errors import SetupError


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from finetune.train import check_config, train

    try:
        check_config(cfg)
        return train(cfg)["objective"]
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:
        print(f"interrupted by SIGTERM: a resumable checkpoint is in {cfg.paths.output_dir}/checkpoints; continue "
              f"with the same command plus resume=auto hydra.run.dir={cfg.paths.output_dir}", file=sys.stderr)
        sys.exit(143)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
