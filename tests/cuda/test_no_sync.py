"""On a GPU: 10 PGS training steps (static token budget, feature cache) with torch.cuda's sync debug
mode on inside each step. megapgs's own code must not synchronise with the device there; DeepSpeed's
own syncs (its finite-gradient-norm check under ZeRO-1/2/3, bf16 overflow checks) are listed, not
failed. The CPU twin of this test is tests/train/test_host_sync.py."""
import warnings
from pathlib import Path

import pytest
import torch

from megapgs.entry import main as pretrain
from megapgs.train import loop

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SYNC_WARNING = "synchronizing"


def run_with_sync_debug(tmp_path: Path, monkeypatch, *overrides: str) -> list[warnings.WarningMessage]:
    caught: list[warnings.WarningMessage] = []

    class WatchedStep(loop.TrainStep):
        def __call__(self, micro_batches):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return super().__call__(micro_batches)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    caught.extend(w for w in seen if SYNC_WARNING in str(w.message))

    monkeypatch.setattr(loop, "TrainStep", WatchedStep)
    sets = ["data.source=synthetic", "pgs.masking=pgs", "pgs.unmasked_tail=0", "pgs.packed_length=static",
            "train.steps=10", "train.global_batch_size=64", "train.micro_batch_size=32", "log.every_steps=5",
            "eval.zeroshot=false", "eval.retrieval=false", "log.tensorboard=false", "log.progress=false",
            f"train.output_dir={tmp_path / 'run'}", *overrides]
    assert pretrain([arg for s in sets for arg in ("--set", s)]) == 0
    return caught


def where(warning: warnings.WarningMessage) -> str:
    return f"{warning.filename.split('site-packages/')[-1]}:{warning.lineno}"


@pytest.mark.parametrize("deepspeed", [
    '{"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}',  # fp32
    '{"bf16": {"enabled": true}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}',
    '{"bf16": {"enabled": true}, "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}',
])
def test_only_deepspeed_syncs_in_a_step(tmp_path, monkeypatch, deepspeed):
    """DeepSpeed's clipping builds its norm with torch.tensor(..., device) under ZeRO-0 and checks it
    for finiteness under ZeRO-1/2/3: its syncs, listed; none may come from anywhere else."""
    caught = run_with_sync_debug(tmp_path, monkeypatch, f"deepspeed={deepspeed}")
    print("\nDeepSpeed's own syncs in 10 steps:", sorted({where(w) for w in caught}))
    ours = [where(w) for w in caught if "/deepspeed/" not in w.filename]
    assert ours == []
