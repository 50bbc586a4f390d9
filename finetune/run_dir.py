"""What a run directory already holds decides what a new run there may do.

A finished run (summary.json) is a record: ``resume=auto`` skips it only when its config is the
one asked for now (how a sweep is resumed), extends it when only ``trainer.max_epochs`` grew, and
refuses any other difference; a run started there without ``resume`` is refused instead of
overwriting that record or mixing its checkpoints with new ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import SetupError

log = logging.getLogger(__name__)

CONFIG_NAME = "resolved_config.yaml"
SUMMARY_NAME = "summary.json"
# Keys that do not change what a run computes (where files go, how it is shown, where it runs):
# they neither name a sweep job's folder (conf/hydra/default.yaml's exclude_keys) nor make a
# finished run's config differ.
RESULT_NEUTRAL_KEYS = ("resume", "paths", "cache.dir", "callbacks.progress_bar", "data.num_workers",
                       "trainer.accelerator", "trainer.devices")
_MISSING = "<not set>"


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
    """Keys whose values differ (result-neutral keys left out): ``{key: (old, new)}``."""
    a, b = _flatten(old), _flatten(new)
    return {key: (a.get(key, _MISSING), b.get(key, _MISSING)) for key in sorted(set(a) | set(b))
            if not _neutral(key) and a.get(key, _MISSING) != b.get(key, _MISSING)}


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


def claim_run_dir(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """The finished run's summary when ``resume=auto`` should skip it; None when this run may go on.

    Raises a SetupError (nothing written) when the directory holds a run this one would overwrite.
    """
    resume = cfg.get("resume")
    finished = out_dir / SUMMARY_NAME
    if not finished.is_file():
        has_checkpoints = any((out_dir / "checkpoints").glob("*.ckpt"))
        if resume in (None, False, "none", "null", "") and has_checkpoints:
            raise SetupError(
                f"{out_dir} holds checkpoints of an unfinished run; starting a new run there would mix the two. "
                f"Continue it with resume=auto (same hydra.run.dir), or choose another hydra.run.dir (the default "
                f"is a new timestamped folder), or delete that folder to start over."
            )
        return None
    if resume != "auto":
        raise SetupError(
            f"{out_dir} already holds a finished run ({SUMMARY_NAME}); a new run there would overwrite its record "
            f"and mix its checkpoints with new ones. Choose another hydra.run.dir (or hydra.sweep.dir for a "
            f"sweep; the default is a new timestamped folder), use resume=auto to skip it (or to extend it with a "
            f"larger trainer.max_epochs), or delete that folder to redo it."
        )
    stored = out_dir / CONFIG_NAME
    diffs = config_differences(_load(stored.read_text()), resolved_config(cfg)) \
        if stored.is_file() else {}
    if not diffs:
        log.info("resume=auto: %s is finished with the same config; skipping it", out_dir)
        return json.loads(finished.read_text())
    if _extends(diffs):
        kept = finished.rename(out_dir / "summary.previous.json")
        log.info("resume=auto: extending the finished run in %s to trainer.max_epochs=%s (its summary is kept "
                 "as %s)", out_dir, diffs["trainer.max_epochs"][1], kept.name)
        return None
    raise SetupError(
        f"resume=auto: {out_dir} holds a finished run with another config ({_describe(diffs)}). Its results "
        f"are not those of this config, and a new run there would overwrite them. Give the new settings their "
        f"own hydra.run.dir (or a new hydra.sweep.dir for a sweep), or delete that folder to redo it."
    )
