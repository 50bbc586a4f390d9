"""Checked at the door: `python -m finetune ARGS` is composed and checked before Hydra creates anything.

Hydra writes the run folder (``.hydra/``, the log file) before it calls the task function, so a config
mistake found inside the task leaves an ``outputs/DATE/TIME/`` behind. :func:`admit` parses the same
command line with Hydra's own parser, composes each job of it with Hydra's compose API (every job of a
``-m`` sweep, up to :data:`MAX_JOBS`), converts it to the typed schema, runs every check a run makes
before it touches data, and refuses with one :class:`~finetune.errors.SetupError` paragraph. Only an
admitted command reaches ``@hydra.main``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune import config_dir
from finetune.config.identity import result_defining
from finetune.config.problems import ConfigProblem, explain
from finetune.config.schema import FinetuneConfig
from finetune.config.typed import to_typed
from finetune.errors import SetupError

MAX_JOBS = 64  # sweep jobs composed and checked one by one; a larger grid has the first ones checked
# Hydra flags after which no job runs (help, printing the config, shell completion) or another config
# folder is used: Hydra handles those alone.
HYDRA_ONLY = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "experimental_rerun",
              "config_path", "config_name", "config_dir")


def admit(argv: Sequence[str]) -> None:
    """Raise a SetupError if any job of this command line would be refused; return when all may run."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser  # Hydra's own grammar of its command line
    from hydra.errors import HydraException

    args = get_args_parser().parse_args(list(argv))
    if any(getattr(args, flag, None) for flag in HYDRA_ONLY):
        return
    jobs = expand(args.overrides, bool(args.multirun))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for overrides in jobs[:MAX_JOBS]:
            try:
                try:
                    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
                except (HydraException, ValueError) as error:  # also OmegaConf's errors, which Hydra wraps
                    raise explain(error) from None
                check_job(cfg, multirun=bool(args.multirun))
            except SetupError as error:
                if len(jobs) > 1:  # say which job of the sweep
                    raise SetupError(f"{error} (sweep job: {' '.join(overrides)})") from None
                raise


def expand(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command line: one, or every combination of a ``-m`` sweep's values."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise explain(error) from None
    if not multirun:
        return [list(overrides)]
    try:
        return BasicSweeper.split_arguments(parsed, None)[0] or [[]]
    except HydraException:  # interval() and other sweeps a sweeper plugin (Optuna) samples: check the rest
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]


def check_job(composed: Any, multirun: bool) -> FinetuneConfig:
    """Every check of one composed job (with its ``hydra`` node) that needs no data."""
    from omegaconf import OmegaConf, open_dict

    hydra = composed.hydra
    multirun = multirun or str(hydra.get("mode")) == "RunMode.MULTIRUN" or hydra.get("mode") == "MULTIRUN"
    run_dir = None if multirun else _resolved(hydra.run, "dir")
    direction = OmegaConf.select(hydra, "sweeper.direction", default=None)
    with open_dict(composed):
        del composed["hydra"]
        composed.paths.output_dir = run_dir or "(sweep job folder)"
    cfg = to_typed(composed)
    check_direction(cfg, direction if isinstance(direction, str) else None)
    check_device(cfg)
    check_model(cfg)
    check_paths(cfg)
    if run_dir is not None and Path(run_dir).is_dir():
        from finetune.run.run_dir import claim_run_dir, lock_run_dir

        claim_run_dir(cfg, Path(run_dir), result_defining(cfg), compare_data=False)
        lock_run_dir(Path(run_dir))  # held until this process ends: Hydra's .hydra/ of a running run stays
    return cfg


def _resolved(node: Any, key: str) -> str | None:
    try:
        return str(node[key])
    except Exception:  # an interpolation only Hydra's job context resolves: no fixed folder to check
        return None


def check_direction(cfg: FinetuneConfig, direction: str | None) -> None:
    """An Optuna sweep's direction must agree with the monitor, or it would look for the worst runs."""
    mode = cfg.best_mode()
    wanted = {"max": "maximize", "min": "minimize"}[mode]
    if direction is not None and direction != wanted:
        raise ConfigProblem("hydra.sweeper.direction", direction, f"disagrees with monitor={cfg.monitor}, which is "
                            f"best when it is {mode}imal: the sweep would look for the worst runs",
                            f"set hydra.sweeper.direction={wanted} (or monitor_mode to match).")


def check_device(cfg: FinetuneConfig) -> None:
    """An accelerator or device count this machine does not have, named before anything starts."""
    import torch

    accelerator = str(cfg.trainer.accelerator).lower()
    devices = cfg.trainer.devices
    if accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigProblem("trainer.accelerator", cfg.trainer.accelerator, "asks for a CUDA GPU, and torch sees "
                                "none on this machine", "use trainer.accelerator=cpu (or auto, which takes a GPU "
                                "when there is one).")
        if isinstance(devices, int) and devices > count:
            raise ConfigProblem("trainer.devices", devices, f"is more GPUs than this machine has ({count})",
                                f"use trainer.devices={count} or fewer (or auto).")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigProblem("trainer.accelerator", "mps", "needs Apple's Metal GPU, which this machine lacks",
                            "use trainer.accelerator=cpu or auto.")
    elif accelerator not in ("auto", "cpu"):
        from pytorch_lightning.accelerators import AcceleratorRegistry

        if accelerator not in AcceleratorRegistry.available_accelerators():
            raise ConfigProblem("trainer.accelerator", cfg.trainer.accelerator, "is not an accelerator Lightning "
                                "knows", "use auto, cpu, gpu (cuda) or mps.")


def check_paths(cfg: FinetuneConfig) -> None:
    """Files and folders the config names that must already exist."""
    from finetune.model.backbones import weights_source

    if cfg.data.name == "folder" and not Path(str(cfg.data.root)).expanduser().is_dir():
        raise ConfigProblem("data.root", cfg.data.root, "is not a folder", "data=folder reads your images from "
                            "data.root=/path/to/images (class folders inside, or train/ val/ test/ of them).")
    weights = cfg.backbone.weights
    if weights_source(weights) == "file" and not Path(weights).expanduser().is_file():
        raise ConfigProblem("backbone.weights", weights, "is neither imagenet, none nor an existing file",
                            "give the path of a state_dict (.pth) or finetune checkpoint (.ckpt).")
    resume = cfg.resume
    if resume not in (None, "auto") and not Path(resume).expanduser().is_file():
        raise ConfigProblem("resume", resume, "is neither auto nor an existing checkpoint file",
                            "resume=auto continues the run folder's newest checkpoint.")


def check_model(cfg: FinetuneConfig) -> None:
    """The backbone exists, takes the image size, and the strategy fits its stages (unfreeze_last, milestones)."""
    from finetune.model.backbones import check_image_size, stage_names_of
    from finetune.model.strategies import unfreeze_schedule

    check_image_size(cfg.backbone.name, cfg.data.image_size)
    unfreeze_schedule(stage_names_of(cfg.backbone.name), str(cfg.strategy.name), cfg.strategy.unfreeze_last,
                      cfg.strategy.milestones, cfg.strategy.freeze_epochs)
