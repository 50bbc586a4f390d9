"""Interruptions: SIGKILL + resume equals an uninterrupted run; SIGTERM saves; writes are atomic; NaN stops."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import open_dict
from PIL import Image

from finetune.config.identity import DATA_KEY, result_defining
from finetune.config.typed import to_typed
from finetune.errors import SetupError
from finetune.run.resume import AtomicCheckpointIO, TrainingDiverged, check_resume_matches
from finetune.run.train import train
from tests.conftest import kill_resume_and_compare, write_image_folder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process trainings; subprocesses get ENV


def _args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "backbone=resnet18", "backbone.weights=none",
            "strategy=full_finetune", "data=folder", f"data.root={root}", "data.image_size=32", "data.batch_size=2",
            "data.num_workers=0", "data.check=false", "trainer.max_epochs=3", "trainer.accelerator=cpu",
            "callbacks.progress_bar=none", "optimizer.lr=3e-3", "head.dropout=0.2", f"hydra.run.dir={run_dir}",
            *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", classes=3, per_class=40)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path: Path, big_folder: Path) -> None:
    # killed 0.3 s after epoch 1's checkpoint: inside epoch 2 (of 24 steps at batch 4: half as many AdamW steps)
    kill_resume_and_compare(lambda run_dir, *extra: _args(big_folder, run_dir, "data.batch_size=4", *extra),
                            tmp_path, ENV, kill_after_epoch=0, settle=0.3)


def test_interrupt_saves_resumable_checkpoint(tmp_path: Path, big_folder: Path) -> None:
    """SIGTERM (143) and Ctrl-C (130) mid-training each save interrupted.ckpt, print how to resume, and
    resume=auto finishes. The two runs go side by side (one torch thread each): they share no files."""
    cases = {"sigterm": (signal.SIGTERM, 143), "ctrl-c": (signal.SIGINT, 130)}
    runs = {case: tmp_path / case for case in cases}
    # batch 4: 30 steps an epoch, so the signal 1 s into training lands in the first epoch of two
    procs = {case: subprocess.Popen(_args(big_folder, runs[case], "trainer.max_epochs=2", "data.batch_size=4"), env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for case in cases}
    resumed: dict[str, subprocess.Popen] = {}
    try:
        for case, (sent, _code) in cases.items():
            _wait_for(runs[case] / "csv" / "hparams.yaml", procs[case])  # training has started
            time.sleep(1.0)
            procs[case].send_signal(sent)
        for case, (_sent, code) in cases.items():
            _, stderr = procs[case].communicate(timeout=120)
            assert procs[case].returncode == code, f"{case}: {stderr[-2000:]}"
            assert "resume=auto" in stderr and "Traceback" not in stderr, f"{case}: {stderr[-2000:]}"
            assert (runs[case] / "checkpoints" / "interrupted.ckpt").is_file(), case
        resumed.update({case: subprocess.Popen(_args(big_folder, runs[case], "trainer.max_epochs=2",
                                                     "data.batch_size=4", "resume=auto"),
                                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                        for case in cases})
        for case, proc in resumed.items():
            _, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{case}: {stderr[-2000:]}"
            assert (runs[case] / "summary.json").is_file(), case
    finally:
        for proc in [*procs.values(), *resumed.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_interrupted_write_never_replaces_a_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    io.teardown()  # as Lightning does after an interrupted run: the first save's commit is done
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


class _SignalsMidWrite:
    """A file that sends ``signum`` to this process on its 3rd write: a Ctrl-C landing inside torch.save."""

    def __init__(self, f, signum: int) -> None:
        self.f, self.signum, self.writes = f, signum, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), self.signum)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_ctrl_c_inside_a_checkpoint_write_waits_for_the_write(tmp_path: Path, monkeypatch) -> None:
    """CI saw it: a KeyboardInterrupt inside torch.save's writer became ``RuntimeError: unexpected pos`` and
    the run ended with exit 1 and a traceback. Now the save completes, then Ctrl-C arrives as itself."""
    path = tmp_path / "last.ckpt"
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _SignalsMidWrite(f, signal.SIGINT)))
    io = AtomicCheckpointIO()
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.arange(100_000.0)}}, path)
    monkeypatch.undo()
    io.teardown()  # Lightning's teardown after the KeyboardInterrupt: the queued commit lands
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.arange(100_000.0))
    assert list(tmp_path.iterdir()) == [path]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_checkpoint_fsync_runs_beside_training_and_a_load_waits_for_it(tmp_path: Path, monkeypatch) -> None:
    """The fsync (0.6 ms to seconds) is off the training thread; whoever reads the file next sees it whole."""
    synced_in: list[str] = []
    real_fsync = os.fsync
    release = threading.Event()

    def slow_fsync(fd: int) -> None:
        synced_in.append(threading.current_thread().name)
        release.wait(10)  # a slow disk: the save has returned long before this is done
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert not path.exists()  # written, not yet renamed: training went on
    threading.Timer(0.2, release.set).start()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))  # waited for the commit
    assert synced_in and threading.main_thread().name not in synced_in
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_failed_fsync_keeps_the_old_best_runs_nothing_after_it_and_is_raised(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    old_best, new_best = tmp_path / "best-epoch01.ckpt", tmp_path / "best-epoch02.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, old_best)
    io.teardown()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):  # at the next call, or at teardown: never lost
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, new_best)
        io.remove_checkpoint(old_best)  # ModelCheckpoint drops the old best after saving the new one
        io.teardown()
    monkeypatch.undo()
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == [old_best.name]  # the only good best stays, no temp
    assert torch.equal(torch.load(old_best, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_sigterm_inside_a_write_reaches_the_handler_after_it(tmp_path: Path) -> None:
    from finetune.atomic import write_atomic

    seen: list[tuple[int, bool]] = []
    target = tmp_path / "summary.json"
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append((signum, target.is_file())))
    try:
        def write(f) -> None:
            f.write(b"{")
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one while held: delivered once
            f.write(b"}")

        write_atomic(target, write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [(signal.SIGTERM, True)]  # after the rename, not during the write
    assert target.read_bytes() == b"{}"


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(compose_cfg, image_folder: Path,
                                                                 monkeypatch) -> None:
    from finetune.model.module import FinetuneModule

    original = FinetuneModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(FinetuneModule, "training_step", poisoned)
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
                      "data.num_workers=0", "trainer.max_epochs=3", "logger=none", "cache.enabled=false")
    with pytest.raises(TrainingDiverged, match=r"global step \d+ .*lower optimizer.lr"):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0  # epoch 1's good weights, not the diverged ones
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "interrupted.ckpt").exists()


def test_resume_from_other_backbone_is_refused(compose_cfg, image_folder: Path) -> None:
    common = ("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
              "data.num_workers=0", "trainer.max_epochs=1", "logger=none")
    first = train(compose_cfg(*common))
    cfg = compose_cfg(*common, "backbone=vgg11", f"resume={first['best_checkpoint']}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / "continued")  # not the finished run's
    with pytest.raises(SetupError, match=r"backbone.name: resnet18 there, vgg11 now"):
        train(cfg)


@pytest.fixture
def partial_run(compose_cfg, image_folder: Path, tmp_path: Path):
    """A finished 1-epoch partial_unfreeze run's last.ckpt, and the overrides that made it."""
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    common = ("strategy=partial_unfreeze", f"backbone.weights={weights}", "data=folder", f"data.root={image_folder}",
              "data.image_size=32", "data.num_workers=0", "data.check=false", "trainer.max_epochs=1",
              "logger=none", "cache.enabled=false")
    train(compose_cfg(*common))
    return Path(compose_cfg().paths.output_dir) / "checkpoints" / "last.ckpt", common


def identity_now(cfg, checkpoint: Path) -> dict:
    """This config's identity over the checkpoint's data (the data fingerprint is not what these tests vary)."""
    recorded = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["identity"]
    return result_defining(to_typed(cfg), recorded[DATA_KEY])


REFUSED_CHANGES = [
    ("strategy.unfreeze_last=3", r"strategy.unfreeze_last: 2 there, 3 now"),
    ("head.type=mlp", r"head.type: linear there, mlp now"),
    ("head.dropout=0.3", r"head.dropout: 0.0 there, 0.3 now"),
    ("backbone.weights=none", r"backbone.weights: /.*resnet18.pt there, none now"),
    ("optimizer.lr=0.5", r"optimizer.lr: 0.001 there, 0.5 now"),
    ("seed=99", r"seed: 42 there, 99 now"),
    ("data.image_size=48", r"data.image_size: 32 there, 48 now"),
    ("data.augment=true", r"data.augment: auto there, true now"),
]


def test_resume_with_a_result_defining_change_is_refused_up_front(compose_cfg, partial_run) -> None:
    last, common = partial_run  # one trained run; each change is checked against its checkpoint
    for change, named in REFUSED_CHANGES:
        with pytest.raises(SetupError, match=named + r".*only trainer.max_epochs may grow"):
            check_resume_matches(last, identity_now(compose_cfg(*common, change), last))


def test_resume_may_extend_max_epochs_and_name_the_same_weights_another_way(compose_cfg, partial_run,
                                                                            monkeypatch) -> None:
    last, common = partial_run
    weights = Path(next(o for o in common if o.startswith("backbone.weights=")).split("=", 1)[1])
    monkeypatch.chdir(weights.parent)
    same = [o for o in common if not o.startswith(("backbone.weights=", "trainer.max_epochs="))]
    check_resume_matches(last, identity_now(compose_cfg(*same, f"backbone.weights=./{weights.name}",
                                                        "trainer.max_epochs=2", "data.num_workers=2"), last))
    summary = train(compose_cfg(*common, "trainer.max_epochs=2", "resume=auto"))
    assert summary["epochs_run"] == 2


def unfinish(run_dir: Path) -> dict[str, bytes]:
    (run_dir / "summary.json").unlink()  # an unfinished run, as after a crash
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_resume_refuses_another_seed_data_root_data_file_or_transform(compose_cfg, partial_run, image_folder: Path,
                                                                     tmp_path: Path) -> None:
    """The wrong results of old: a resume with seed=99 extracted a new cache under the old backbone."""
    last, common = partial_run
    run_dir = last.parent.parent
    before = unfinish(run_dir)
    other = write_image_folder(tmp_path / "other", classes=3, seed=5)
    for change, named in (("seed=99", r"seed: 42 there, 99 now"),
                          (f"data.root={other}", r"data.root: .*images there, .*other now"),
                          ("data.image_size=48", r"data.image_size: 32 there, 48 now")):
        with pytest.raises(SetupError, match=named):
            train(compose_cfg(*common, change, "resume=auto"))
    changed = sorted((image_folder / "class_0").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed, format="PNG" if changed.suffix == ".png" else "JPEG")
    with pytest.raises(SetupError, match=r"data.fingerprint: \w+\.\.\. there, \w+\.\.\. now"):
        train(compose_cfg(*common, "resume=auto"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing rewritten


def test_sweep_skip_refuses_a_finished_run_whose_data_changed(compose_cfg, partial_run, image_folder: Path) -> None:
    _, common = partial_run
    assert train(compose_cfg(*common, "resume=auto"))["epochs_run"] == 1  # skipped: the same run
    changed = sorted((image_folder / "class_1").iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # another size: another file
    with pytest.raises(SetupError, match=r"finished run with another config or data \(data.fingerprint"):
        train(compose_cfg(*common, "resume=auto"))


def test_resume_auto_skips_finished_run(compose_cfg, image_folder: Path) -> None:
    common = ("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.num_workers=0",
              "data.image_size=32", "trainer.max_epochs=1", "logger=none")
    first = train(compose_cfg(*common))
    again = train(compose_cfg(*common, "resume=auto"))
    assert again["finished_at"] == first["finished_at"]


def test_finite_loss_names_the_first_bad_step_without_per_step_checks(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from finetune.run.resume import FiniteLoss

    check = FiniteLoss(every=10)
    trainer = SimpleNamespace(global_step=0, current_epoch=2, default_root_dir=str(tmp_path))
    losses = [1.0] * 13 + [float("nan"), 2.0, float("inf")] + [1.0] * 10
    with pytest.raises(TrainingDiverged, match=r"global step 13 \(epoch 2\)"):
        for i, value in enumerate(losses):
            trainer.global_step = i + 1  # Lightning has counted the step when the batch ends
            check.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, i)
    assert i == 19  # found at the next periodic check, not at the bad step itself
    late = FiniteLoss(every=10)
    late.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 0)
    with pytest.raises(TrainingDiverged, match=f"global step {trainer.global_step - 1} "):
        late.on_train_epoch_end(trainer, None)  # a bad last step of an epoch is caught before the next one


def test_refused_resume_leaves_the_run_folder_as_it_was(compose_cfg, partial_run) -> None:
    last, common = partial_run
    run_dir = last.parent.parent
    before = unfinish(run_dir)
    with pytest.raises(SetupError, match=r"optimizer.lr: 0.001 there, 0.5 now"):
        train(compose_cfg(*common, "optimizer.lr=0.5", "resume=auto"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # resolved_config.yaml too


@pytest.mark.parametrize("spelling", ["none", "null", "false"])
def test_no_class_weights_is_the_same_setting_however_spelt(compose_cfg, spelling: str) -> None:
    same = result_defining(to_typed(compose_cfg(f"loss.class_weights={spelling}")))
    assert same == result_defining(to_typed(compose_cfg()))
