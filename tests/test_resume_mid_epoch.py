"""A run stopped by SIGTERM or Ctrl-C mid-epoch and resumed from interrupted.ckpt ends with an uninterrupted run's
weights."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from finetune.data.datamodule import EpochSampler, balanced_sampler
from finetune.model.module import FinetuneModule
from finetune.run.train import train
from tests.conftest import write_image_folder

# Lightning's "... dataloader is not resumable. This can cause unreliable results": wrong once the resume is exact
MID_EPOCH_WARNING = "resuming from a checkpoint that ended before the epoch ended"


@pytest.fixture(autouse=True)
def one_thread():
    """Three short trainings per test: on a shared 2-core machine, torch's thread pool costs ~5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One image folder for the module, so that runs of the same config in different tests are the same run."""
    return write_image_folder(tmp_path_factory.mktemp("mid-epoch-data") / "images")


class StraightRuns:
    """Uninterrupted runs by their overrides: a test comparing with the same config reuses the finished one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple[str, ...], Path] = {}

    def weights(self, compose_cfg, folder: Path, *extra: str) -> dict[str, torch.Tensor]:
        if extra not in self.done:
            out = self.root / f"run{len(self.done)}"
            train(_cfg(compose_cfg, folder, out, *extra))
            self.done[extra] = out
        return _weights(self.done[extra])


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> StraightRuns:
    return StraightRuns(tmp_path_factory.mktemp("straight"))


def _cfg(compose_cfg, folder: Path, out: Path, *extra: str):
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={folder}", "data.image_size=32",
                      "data.batch_size=4", "data.check=false", "data.augment=false", "trainer.max_epochs=2",
                      "logger=none", "head.dropout=0.2", "optimizer.lr=3e-3", *extra)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _sigterm_during(monkeypatch, epoch: int, batch: int) -> None:
    """SIGTERM to this process in the training step of (epoch, batch; -1: the last): Lightning stops after it."""
    original = FinetuneModule.training_step

    def step(self, data, batch_idx):
        if self.current_epoch == epoch and batch_idx == batch % self.trainer.num_training_batches:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "Lightning's SIGTERM handler is not installed: the signal would kill pytest"
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, data, batch_idx)

    monkeypatch.setattr(FinetuneModule, "training_step", step)


def _ctrl_c_during(monkeypatch, step: int, presses: int = 1) -> None:
    """Ctrl-C (SIGINT to this process, ``presses`` times) in the forward of optimizer step ``step`` (counted over
    the run, from 0): inside a batch, or inside a block of resident steps, before its backward."""
    original = FinetuneModule._train_loss

    def loss(self, x, y):
        if self.trainer.global_step == step:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(FinetuneModule, "_train_loss", loss)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _interrupt_resume_compare(compose_cfg, monkeypatch, tmp_path: Path, straight_runs: StraightRuns, folder: Path,
                              *extra: str, at: tuple[int, int] = (1, 2), ctrl_c_at_step: int | None = None) -> dict:
    """Train straight (or reuse that run); train again, SIGTERM in batch ``at`` = (epoch, batch) (or Ctrl-C in
    optimizer step ``ctrl_c_at_step``), resume=auto; compare weights.

    Returns the interrupted checkpoint's batch progress in its epoch, and its global step.
    """
    straight = straight_runs.weights(compose_cfg, folder, *extra)

    stopped = tmp_path / "stopped"
    if ctrl_c_at_step is None:
        _sigterm_during(monkeypatch, *at)
    else:
        _ctrl_c_during(monkeypatch, ctrl_c_at_step)
    with pytest.raises(SIGTERMException if ctrl_c_at_step is None else KeyboardInterrupt):
        train(_cfg(compose_cfg, folder, stopped, *extra))
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is the process's again
    state = torch.load(stopped / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"] | {"step": state["global_step"]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(compose_cfg, folder, stopped, *extra, "resume=auto"))
    resumed = _weights(stopped)
    assert not (stopped / "checkpoints" / "interrupted.ckpt").exists()  # superseded once the resumed fit ended
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{key} differs after the mid-epoch resume"
    assert not [w for w in caught if MID_EPOCH_WARNING in str(w.message)]
    return progress


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(compose_cfg, monkeypatch, tmp_path: Path,
                                                                straight_runs: StraightRuns, folder: Path,
                                                                workers: int) -> None:
    # The QA repro: partial fine-tuning on images (no cache), stopped in the second epoch after its 3rd batch.
    progress = _interrupt_resume_compare(compose_cfg, monkeypatch, tmp_path, straight_runs, folder,
                                         "strategy=partial_unfreeze", "cache.enabled=false",
                                         f"data.num_workers={workers}", at=(1, 2))
    assert progress["completed"] == 3  # saved mid-epoch


# 7 train steps an epoch: read per batch, or resident in blocks of 2 steps (2, 2, 2, 1)
@pytest.mark.parametrize("loop", ["cache.resident=false", "cache.steps_per_block=2"])
def test_mid_epoch_resume_on_cached_features_keeps_the_unfreeze_schedule(compose_cfg, monkeypatch, tmp_path: Path,
                                                                          straight_runs: StraightRuns,
                                                                          folder: Path, loop: str) -> None:
    # layer4 unfreezes at epoch 1, where the run is stopped; the frozen prefix comes from the feature cache.
    progress = _interrupt_resume_compare(compose_cfg, monkeypatch, tmp_path, straight_runs, folder,
                                         "strategy=gradual_unfreeze", "strategy.milestones=[1]", "cache.enabled=true",
                                         "data.num_workers=0", loop, at=(1, 2))
    assert progress["completed"] == 3  # batches (blocks): mid-epoch either way


# 7 optimizer steps an epoch (run steps 7-13 are epoch 1, in blocks 7-8, 9-10, 11-12, 13). Ctrl-C in step 11 of
# the run read per batch, in step 12 (the second of its block), or in step 6 (the last of epoch 0: validation
# follows, and that epoch's checkpoints)
@pytest.mark.parametrize(("loop", "pressed", "stopped_after"), [("cache.resident=false", 11, 12),
                                                                 ("cache.steps_per_block=2", 12, 13),
                                                                 ("cache.steps_per_block=2", 6, 7)])
def test_ctrl_c_stops_after_the_batch_and_the_resume_equals_an_uninterrupted_run(
        compose_cfg, monkeypatch, tmp_path: Path, straight_runs: StraightRuns, folder: Path, loop: str, pressed: int,
        stopped_after: int, caplog) -> None:
    # Python raised KeyboardInterrupt inside the step (here: between forward and backward). Inside a block,
    # interrupted.ckpt then held the weights after step 11 with the block (11-12) not done, and the resume took
    # step 11 again: 15 steps instead of 14, the head off by up to 2.6e-4
    progress = _interrupt_resume_compare(compose_cfg, monkeypatch, tmp_path, straight_runs, folder,
                                         "strategy=feature_extractor", "data.num_workers=0", loop,
                                         ctrl_c_at_step=pressed)
    assert progress["step"] == stopped_after  # whole batches (blocks) only
    assert "Ctrl-C: stopping after this batch" in caplog.text


def test_a_second_ctrl_c_stops_at_once(compose_cfg, monkeypatch, tmp_path: Path, folder: Path) -> None:
    stopped = tmp_path / "stopped"
    _ctrl_c_during(monkeypatch, 9, presses=2)
    try:
        with pytest.raises(SystemExit):  # Lightning's way out of an immediate Ctrl-C: interrupted.ckpt, exit(1)
            train(_cfg(compose_cfg, folder, stopped, "strategy=feature_extractor", "data.num_workers=0",
                       "cache.steps_per_block=4"))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C once it stopped
    state = torch.load(stopped / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 9  # in the middle of the block of steps 7-10: nothing waited


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("val-batches") / "images", per_class=30)  # 3 val batches


EVAL_RUN = ("strategy=feature_extractor", "cache.enabled=false", "data.num_workers=0", "trainer.max_epochs=3")


def _sigterm_in(monkeypatch, step_name: str, when) -> None:
    """SIGTERM to this process in FinetuneModule's ``step_name`` (validation_step, test_step) when ``when(module,
    batch_idx)``."""
    original = getattr(FinetuneModule, step_name)

    def step(self, data, batch_idx):
        if when(self, batch_idx):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, data, batch_idx)

    monkeypatch.setattr(FinetuneModule, step_name, step)


def test_sigterm_during_the_test_leaves_last_ckpt_the_one_to_resume_and_extend(compose_cfg, monkeypatch,
                                                                               tmp_path: Path,
                                                                               val_folder: Path) -> None:
    # interrupted.ckpt was saved during the test too: the best epoch's weights (the test's) with the finished
    # fit's training state, newer than last.ckpt. The resume tested the same, but extending the run
    # (trainer.max_epochs=4, resume=auto) then trained on from the best epoch's weights: head off by 0.044
    import json

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(_cfg(compose_cfg, val_folder, straight, *EVAL_RUN))
    _sigterm_in(monkeypatch, "test_step", lambda module, batch_idx: batch_idx == 1)
    with pytest.raises(SIGTERMException):
        train(_cfg(compose_cfg, val_folder, stopped, *EVAL_RUN))
    monkeypatch.undo()
    assert not (stopped / "checkpoints" / "interrupted.ckpt").exists()
    train(_cfg(compose_cfg, val_folder, stopped, *EVAL_RUN, "resume=auto"))  # fit has nothing left: tests
    ours, theirs = (json.loads((run / "summary.json").read_text()) for run in (stopped, straight))
    assert ours["test"] == theirs["test"]

    longer = (*EVAL_RUN[:-1], "trainer.max_epochs=4", "resume=auto")
    for run in (straight, stopped):
        train(_cfg(compose_cfg, val_folder, run, *longer))
    extended, uninterrupted = _weights(stopped), _weights(straight)
    assert all(torch.equal(extended[key], uninterrupted[key]) for key in uninterrupted)


# with EMA the validation runs on the averaged weights, swapped in at its start and out at its end: a stop half-way
# saved them swapped, and the resumed run trained on from the average (weights off by 0.013, another best epoch)
# (resident: cached features on the device, validated in blocks of one minibatch: 3 val blocks)
@pytest.mark.parametrize("variant", [(), ("regularization.ema_decay=0.9",),
                                     ("cache.enabled=true", "cache.steps_per_block=1")],
                         ids=["plain", "ema", "resident"])
def test_sigterm_during_validation_then_resume_validates_again(compose_cfg, monkeypatch, tmp_path: Path,
                                                               val_folder: Path, variant: tuple[str, ...]) -> None:
    # Lightning's validation loop stops at the next batch on SIGTERM; interrupted.ckpt then said "last train
    # batch done" and the resume skipped that validation: its val metric never reached the best checkpoint (the
    # resumed run's best was best-epoch01.ckpt, the uninterrupted run's best-epoch00.ckpt) and the test ran on
    # other weights
    import json

    run = (*EVAL_RUN, *variant)  # a later override of a key wins
    ema = "regularization.ema_decay=0.9" in variant
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(_cfg(compose_cfg, val_folder, straight, *run))

    seen: list[tuple[int, int]] = []

    def second_val_batch(module, batch_idx: int) -> bool:  # and records the batches validated
        if not module.trainer.sanity_checking:
            seen.append((module.current_epoch, batch_idx))
        return stopping and len(seen) == 2  # the first validation's second batch

    _sigterm_in(monkeypatch, "validation_step", second_val_batch)
    stopping = True
    with pytest.raises(SIGTERMException):
        train(_cfg(compose_cfg, val_folder, stopped, *run))
    first_validation = seen[:2]
    seen.clear()
    stopping = False
    train(_cfg(compose_cfg, val_folder, stopped, *run, "resume=auto"))

    val_batches = max(batch for _, batch in seen) + 1
    assert val_batches > 2 and seen[:val_batches] == [(first_validation[0][0], i) for i in range(val_batches)]
    ours, theirs = (json.loads((run / "summary.json").read_text()) for run in (stopped, straight))
    assert Path(ours["best_checkpoint"]).name == Path(theirs["best_checkpoint"]).name
    assert (ours["best_val_metric"], ours["test"]) == (theirs["best_val_metric"], theirs["test"])
    resumed, uninterrupted = _weights(stopped), _weights(straight)
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)
    last, theirs_last = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                         for run in (stopped, straight))
    assert "validation_unfinished" not in last["callbacks"]["ResumeInEpoch"]  # only a checkpoint saved mid-way
    if ema:  # the raw training weights too, not only the average (last.ckpt's state_dict)
        assert all(torch.equal(last["current_model_state"][key], theirs_last["current_model_state"][key])
                   for key in theirs_last["current_model_state"])


def test_a_checkpoint_saved_before_the_validation_ran_again_still_asks_for_it() -> None:
    # stopped again between the restore and the rerun (e.g. a Ctrl-C while loader workers start)
    from finetune.run.resume import ResumeInEpoch

    callback = ResumeInEpoch()
    callback.load_state_dict({"samples_per_batch": 4, "validation_unfinished": True})
    assert callback.state_dict() == {"samples_per_batch": 4, "validation_unfinished": True}


def test_resume_inside_an_epoch_with_other_cache_blocks_is_refused(compose_cfg, monkeypatch, tmp_path: Path,
                                                                   folder: Path) -> None:
    """Lightning counts done batches: blocks of 2 steps done are not batches of one step done."""
    from finetune.errors import SetupError

    extra = ("strategy=feature_extractor", "data.num_workers=0", "cache.steps_per_block=2")
    stopped = tmp_path / "stopped"
    _sigterm_during(monkeypatch, 1, 1)
    with pytest.raises(SIGTERMException):
        train(_cfg(compose_cfg, folder, stopped, *extra))
    monkeypatch.undo()
    with pytest.raises(SetupError, match="took train batches of 8 samples and this one takes 4"):
        train(_cfg(compose_cfg, folder, stopped, *extra, "cache.resident=false", "resume=auto"))
    assert (stopped / "checkpoints" / "interrupted.ckpt").is_file()  # nothing lost: the right settings resume it
    train(_cfg(compose_cfg, folder, stopped, *extra, "resume=auto"))


def test_resume_at_an_epoch_boundary_skips_nothing_and_draws_that_epochs_order(compose_cfg, monkeypatch,
                                                                               tmp_path: Path,
                                                                               straight_runs: StraightRuns,
                                                                               folder: Path) -> None:
    # SIGTERM in the last batch of epoch 0: Lightning finishes the epoch, so the checkpoint is at its end. With a
    # worker, Lightning 2.6 alone draws epoch 0's order again for epoch 1 (its issue #21938).
    # Same config as test_sigterm_mid_epoch...[1]: compared with the same straight run.
    progress = _interrupt_resume_compare(compose_cfg, monkeypatch, tmp_path, straight_runs, folder,
                                         "strategy=partial_unfreeze", "cache.enabled=false", "data.num_workers=1",
                                         at=(0, -1))
    assert progress["completed"] == progress["ready"] > 3  # a whole epoch


@pytest.mark.parametrize("sampler", [EpochSampler(10, seed=3), balanced_sampler([0, 0, 0, 1, 1, 2, 2, 2, 2, 2], 3)])
def test_start_at_skips_the_done_samples_once(sampler: EpochSampler) -> None:
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.start_at(4, 6)
    assert list(sampler) == full[6:] and len(sampler) == 10  # Lightning still counts the whole epoch
    assert list(sampler) == full  # one-shot: the next epoch is whole again
    sampler.start_at(4, 6)
    sampler.set_epoch(5)  # a skip belongs to its epoch
    assert len(list(sampler)) == 10


def test_batches_of_a_positioned_loader_are_the_remaining_batches_of_the_epoch() -> None:
    from torch.utils.data import DataLoader

    sampler = EpochSampler(11, seed=0)
    loader = DataLoader(list(range(11)), batch_size=3, sampler=sampler, drop_last=True)
    sampler.set_epoch(2)
    whole = [b.tolist() for b in loader]
    sampler.start_at(2, 2 * 3)
    assert [b.tolist() for b in loader] == whole[2:] and len(loader) == 3
