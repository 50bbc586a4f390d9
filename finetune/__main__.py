"""`python -m finetune [overrides]`: train one run (or a sweep with -m) from the Hydra config.

The command line is checked at the door (:func:`finetune.run.door.admit`) before Hydra creates a run
folder; inside the job the config is turned once into typed objects.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

import finetune.config.schema  # noqa: F401  (registers the schema conf/config.yaml starts from)
from finetune import config_dir
from finetune.errors import Interrupted, SetupError, report_error

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from finetune.run.console import show_result
    from finetune.run.interrupts import say_how_to_resume, stop_on_sigterm
    from finetune.run.run_dir import is_launch_rank_zero
    from finetune.run.train import train

    started = time.time()
    out_dir = str(cfg.paths.output_dir)
    stop_on_sigterm()
    try:
        summary = train(cfg)
        if is_launch_rank_zero():
            show_result(summary, fancy=None if cfg.callbacks.progress_bar != "none" else False)
        return summary["objective"]
    except SetupError as err:
        _log_to_file(f"error: {err}")  # the run's finetune.log says why it stopped; the console says it once
        sys.exit(report_error(err))
    except (SIGTERMException, Interrupted):
        say_how_to_resume("SIGTERM", out_dir)
        sys.exit(143)
    except KeyboardInterrupt:  # Ctrl-C outside fit (the data check), or the first one in training
        say_how_to_resume("Ctrl-C", out_dir)
        sys.exit(130)
    except SystemExit as stop:
        # Lightning turns an immediate Ctrl-C (the second in training) into exit(1) after our callback saved
        # interrupted.ckpt
        saved = Path(out_dir) / "checkpoints" / "interrupted.ckpt"
        if stop.code == 1 and saved.is_file() and saved.stat().st_mtime >= started:
            say_how_to_resume("Ctrl-C", out_dir)
            sys.exit(130)
        raise


def _log_to_file(message: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main() -> None:
    from finetune.run.door import admit
    from finetune.run.interrupts import die_with_launcher

    die_with_launcher()
    try:
        admit(sys.argv[1:])
    except SetupError as err:
        sys.exit(report_error(err))
    _run()


if __name__ == "__main__":
    main()
