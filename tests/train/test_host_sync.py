"""A step with no host sync: 10 PGS training steps (static token budget, feature cache) read
nothing back from the device outside the every-N-steps fetch.

A CPU has no device queue to drain, so the test looks for the calls that would drain one on a GPU:
every read-back of a tensor's values to the host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`bool()`, `int()`, `float()`, `operator.index`). None may happen inside a step: not on device
tensors (a sync), and not on host tensors either (there is no need, and the check stays simple).
The loader's own host work (megapgs/data) and the fetch (Window.fetch, StageTimer.collect) are
outside the rule. tools/gpu_check.sh repeats the check on a GPU with torch.cuda's sync debug mode.
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

from megapgs.config import REPO_ROOT
from megapgs.entry import main as pretrain

READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
IN_STEP = ("megapgs/train/step.py", "megapgs/train/window.py")   # frames that make a call part of a step
OUTSIDE_THE_RULE = ("megapgs/data/",)                            # the loader's host work
FETCH = {("megapgs/train/window.py", "fetch"), ("megapgs/perf/timers.py", "collect")}
PACKAGE = (REPO_ROOT / "megapgs").as_posix() + "/"  # this checkout's package, wherever it was cloned


class ReadBackRecorder:
    """Patches torch.Tensor's read-back methods to record the ones called inside a step."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in READ_BACKS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def recorded(tensor, *args, **kwargs):
            where = self._where()
            if where is not None:
                self.calls.append(f"Tensor.{name} at {where}")
            return original(tensor, *args, **kwargs)

        return recorded

    @staticmethod
    def _where() -> str | None:
        """'file:line (function)' of the nearest megapgs/DeepSpeed frame when inside a step, else None."""
        frame, in_step, first = sys._getframe(2), False, None
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            module = path[len(PACKAGE) - len("megapgs/"):] if path.startswith(PACKAGE) else None  # megapgs/...
            if module is not None:
                if module.startswith(OUTSIDE_THE_RULE) or (module, frame.f_code.co_name) in FETCH:
                    return None
                if module.startswith(IN_STEP):
                    in_step = True
            if first is None and ("/megapgs/" in path or "/deepspeed/" in path):
                first = f"{path.split('site-packages/')[-1]}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return first if in_step else None


def train(tmp_path: Path, *overrides: str) -> int:
    sets = ["data.source=synthetic", "pgs.masking=pgs", "pgs.unmasked_tail=0", "train.steps=10",
            "train.global_batch_size=32", "train.micro_batch_size=16", "log.every_steps=5",
            "eval.zeroshot=false", "eval.retrieval=false", "log.tensorboard=false", "log.progress=false",
            f"train.output_dir={tmp_path / 'run'}", *overrides]
    return pretrain([arg for s in sets for arg in ("--set", s)])


@pytest.mark.parametrize("contrastive", ["global", "micro_batch"])
def test_ten_pgs_steps_read_nothing_back(tmp_path, monkeypatch, contrastive):
    recorder = ReadBackRecorder(monkeypatch)
    assert train(tmp_path, "pgs.packed_length=static", f"train.contrastive_batch={contrastive}") == 0
    assert recorder.calls == []


def test_the_recorder_sees_the_exact_packings_sync(tmp_path, monkeypatch):
    """Exact packing reads the keep counts back once per micro-batch: the recorder must see it."""
    recorder = ReadBackRecorder(monkeypatch)
    assert train(tmp_path, "pgs.packed_length=exact") == 0
    assert any("pgs/selection.py" in call and "(_finish)" in call for call in recorder.calls), recorder.calls[:5]
    # once per micro-batch (the cached pass replays the masks): 10 steps x 2 micro-batches
    assert len([c for c in recorder.calls if "(_finish)" in c and "Tensor.cpu" in c]) == 10 * 2


# DeepSpeed's own read-backs under ZeRO-1/2/3 (its code, not ours; tools/gpu_check.sh measures them on a
# GPU): the finite-gradient-norm check of every optimizer step, and its rank-consistency checks while it
# records ZeRO-3's module trace (the first steps only).
DEEPSPEED_OWN = ("deepspeed/runtime/utils.py:233 (is_invalid_grad_norm)", "deepspeed/runtime/zero/utils.py")


@pytest.mark.parametrize("stage", [1, 3])
def test_under_zero_the_only_read_backs_are_deepspeeds_own(tmp_path, monkeypatch, stage):
    recorder = ReadBackRecorder(monkeypatch)
    assert train(tmp_path, "pgs.packed_length=static", f'deepspeed={{"zero_optimization": {{"stage": {stage}}}}}') == 0
    ours = [call for call in recorder.calls if not any(site in call for site in DEEPSPEED_OWN)]
    assert ours == []
    grad_norm_checks = [call for call in recorder.calls if "is_invalid_grad_norm" in call]
    assert len(grad_norm_checks) <= 10 * (3 if stage == 1 else 1)  # per optimizer step, never per micro-batch


@pytest.mark.parametrize("stage", [0, 3])
def test_compiled_blocks_compile_a_handful_of_times(tmp_path, monkeypatch, stage):
    """20 PGS steps with model.compile: Block.forward compiles at most 4 graphs (3 recompiles): once
    static, once with the token dimension symbolic (the captions' length changes every batch, and
    dynamo makes that dimension dynamic for both towers, which share the code), and each again
    without gradients for the feature cache's first pass. Under ZeRO-3 too, whose gathering hooks
    stay outside the compiled code. Dynamo's guards decide recompiles, whatever the backend: the
    test compiles with aot_eager (tests/models/test_compile.py runs inductor on a block)."""
    from torch._dynamo.utils import counters

    compile_eagerly = functools.partial(torch.compile, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    counters.clear()
    assert train(tmp_path, "pgs.packed_length=static", "model.compile=true", "train.steps=20",
                 f'deepspeed={{"zero_optimization": {{"stage": {stage}}}}}') == 0
    assert counters["stats"]["unique_graphs"] <= 4 and counters["frames"]["ok"] <= 4
    assert not counters["graph_break"]
