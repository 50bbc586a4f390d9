"""`python -m finetune [overrides]`: train one run (or a sweep with -m) from the Hydra config."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from finetune import config_dir
from finetune.errors import SetupError


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from finetune.run.train import check_config, train

    started = time.time()
    try:
        check_config(cfg)
        return train(cfg)["objective"]
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SIGTERMException:
        _say_how_to_resume("SIGTERM", cfg)
        sys.exit(143)
    except SystemExit as stop:
        # Lightning turns Ctrl-C into exit(1) after our callback saved interrupted.ckpt
        saved = Path(cfg.paths.output_dir) / "checkpoints" / "interrupted.ckpt"
        if stop.code == 1 and saved.is_file() and saved.stat().st_mtime >= started:
            _say_how_to_resume("Ctrl-C", cfg)
            sys.exit(130)
        raise


def _say_how_to_resume(cause: str, cfg: DictConfig) -> None:
    print(f"interrupted by {cause}: a resumable checkpoint is in {cfg.paths.output_dir}/checkpoints; continue "
          f"with the same command plus resume=auto hydra.run.dir={cfg.paths.output_dir}", file=sys.stderr)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
