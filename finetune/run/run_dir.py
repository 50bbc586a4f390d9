"""What a run directory already holds decides what a new run there may do.

A finished run (summary.json) is a record: ``resume=auto`` skips it only when its config is the
one asked for now (how a sweep is resumed), extends it when only ``trainer.max_epochs`` grew, and
refuses any other difference; a run started there without ``resume`` is refused instead of
overwriting that record or mixing its checkpoints with new ones. Deciding writes nothing; an
extension sets the old summary aside only after the resume's own checks passed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import SetupError

log = logging.getLogger(__name__)

CONFIG_NAME = "resolved_config.yaml"  # the run's config, resolved: written before training
SUMMARY_NAME = "summary.json"  # written last: its presence means the run finished
NO_RESUME = (None, False, "none", "null", "")  # how a config says "start fresh"
# Keys that do not change what a run computes (where files go, how it is shown, where it runs):
# they neither name a sweep job's folder (conf/hydra/default.yaml's exclude_keys) nor make a
# finished run's config differ.
RESULT_NEUTRAL_KEYS = ("resume", "paths", "cache.dir", "callbacks.progress_bar", "data.num_workers",
                       "trainer.accelerator", "trainer.devices")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _neutral(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in RESULT_NEUTRAL_KEYS)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as it is written to ``resolved_config.yaml`` and read back (same types both sides)."""
    return _load(OmegaConf.to_yaml(cfg, resolve=True))


def _load(text: str) -> dict[str, Any]:
    loaded = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    return loaded if isinstance(loaded, dict) else {}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: ``{key: (old, new)}``.

    Left out: result-neutral keys; keys only one side has (a config key added by a later version
    of finetune is not a difference of the run); and paths under the run's own folder, compared
    relative to it (``callbacks.checkpoint.dirpath`` ... of a run folder that was moved or copied).
    """
    a, b = _flatten(old), _flatten(new)
    home_a, home_b = str(a.get("paths.output_dir", "")), str(b.get("paths.output_dir", ""))
    return {key: (a[key], b[key]) for key in sorted(set(a) & set(b))
            if not _neutral(key) and _rebased(a[key], home_a, home_b) != b[key]}


def _rebased(value: Any, old_home: str, new_home: str) -> Any:
    """A path inside the old run folder, as the same path inside the new one."""
    if old_home and isinstance(value, str) and (value == old_home or value.startswith(old_home.rstrip("/") + "/")):
        return new_home + value[len(old_home):]
    return value


def _describe(diffs: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    shown = [f"{key}: {old} there, {new} now" for key, (old, new) in list(diffs.items())[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more


def _extends(diffs: dict[str, tuple[Any, Any]]) -> bool:
    """Only more epochs asked for: the finished run continues from its last checkpoint."""
    if set(diffs) != {"trainer.max_epochs"}:
        return False
    old, new = diffs["trainer.max_epochs"]
    return isinstance(old, int) and isinstance(new, int) and new > old


@dataclass
class Claim:
    """What a run may do in its folder: ``finished``, the summary of the same run done before (skip it);
    ``extends``, the summary of a finished run this one continues (set aside once its checks passed)."""

    finished: dict[str, Any] | None = None
    extends: Path | None = None


def claim_run_dir(cfg: DictConfig, out_dir: Path) -> Claim:
    """Decide, writing nothing, whether this run may use ``out_dir``; a SetupError when it would overwrite a run."""
    resume = cfg.get("resume")
    finished = out_dir / SUMMARY_NAME
    if not finished.is_file():
        has_checkpoints = any((out_dir / "checkpoints").glob("*.ckpt"))
        if resume in NO_RESUME and has_checkpoints:
            raise SetupError(
                f"{out_dir} holds checkpoints of an unfinished run; starting a new run there would mix the two. "
                f"Continue it with resume=auto (same hydra.run.dir), or choose another hydra.run.dir (the default "
                f"is a new timestamped folder), or delete that folder to start over."
            )
        return Claim()
    if resume != "auto":
        raise SetupError(
            f"{out_dir} already holds a finished run ({SUMMARY_NAME}); a new run there would overwrite its record "
            f"and mix its checkpoints with new ones. Choose another hydra.run.dir (or hydra.sweep.dir for a "
            f"sweep; the default is a new timestamped folder), use resume=auto to skip it (or to extend it with a "
            f"larger trainer.max_epochs), or delete that folder to redo it."
        )
    stored = out_dir / CONFIG_NAME
    diffs = config_differences(_load(stored.read_text()), resolved_config(cfg)) if stored.is_file() else {}
    if not diffs:
        log.info("resume=auto: %s is finished with the same config; skipping it", out_dir)
        return Claim(finished=json.loads(finished.read_text()))
    if _extends(diffs):
        if not (out_dir / "checkpoints" / "last.ckpt").is_file():
            raise SetupError(f"resume=auto with trainer.max_epochs={diffs['trainer.max_epochs'][1]} would extend the "
                             f"finished run in {out_dir}, but its checkpoints/last.ckpt is gone. Give the longer run "
                             f"its own hydra.run.dir.")
        return Claim(extends=finished)
    raise SetupError(
        f"resume=auto: {out_dir} holds a finished run with another config ({_describe(diffs)}). Its results "
        f"are not those of this config, and a new run there would overwrite them. Give the new settings their "
        f"own hydra.run.dir (or a new hydra.sweep.dir for a sweep), or delete that folder to redo it."
    )


def set_aside(summary: Path) -> Path | None:
    """Keep an extended run's old summary under a name of its own; the folder then reads as unfinished.

    Every rank of a multi-process launch may call this: the first one moves the file, the others find
    it gone.
    """
    try:
        epochs = json.loads(summary.read_text()).get("epochs_run")
    except (OSError, ValueError):
        return None
    stem = f"summary.until-epoch{epochs}" if epochs is not None else "summary.previous"
    target, n = summary.with_name(f"{stem}.json"), 1
    while target.exists():
        n += 1
        target = summary.with_name(f"{stem}-{n}.json")
    try:
        summary.rename(target)
    except FileNotFoundError:
        return None
    log.info("resume=auto: extending the finished run in %s (its summary is kept as %s)", summary.parent, target.name)
    return target
