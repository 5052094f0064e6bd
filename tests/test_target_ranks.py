"""benchmarks/target_ranks.py: per-target zero-shot ranks agree with ``eval --asr``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from otcbench.attacks.poison import attack_options, poison_dataset
from otcbench.config import EvalConfig, SynthConfig
from otcbench.data.synth import write_world
from otcbench.eval.run import evaluate
from otcbench.models import create_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "target_ranks.py"


def _script():
    spec = importlib.util.spec_from_file_location("target_ranks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_ranks_match_eval_asr(tmp_path: Path) -> None:
    world = tmp_path / "world"
    write_world(world, SynthConfig(world="compositional", n_train=120, image_size=64, probe_train_per_class=1,
                                   probe_val_per_class=1, test_per_class=2, targets_per_class=2, seed=0))
    poisoned = tmp_path / "p"
    poison_dataset(world, poisoned, attack_options(["adaptive-relabel"], ["n_targets=8", "poisons_per_target=2"]),
                   seed=0)
    torch.manual_seed(0)
    ck = tmp_path / "random.pt"
    torch.save({"model": create_model("otc-rn-grid").state_dict(), "model_name": "otc-rn-grid"}, ck)
    metrics = evaluate(ck, world, EvalConfig(zeroshot=False, linear_probe=False, asr=True), poison=poisoned,
                       out=tmp_path / "m.json")
    mod = _script()
    rows = mod.target_ranks(ck, world, poisoned)
    s = mod.summarise(rows)
    assert s["n"] == 8 == len(rows)
    assert s["asr"] == metrics["asr_targeted"]
    for r in rows:
        assert 1 <= r["adversarial_rank"] <= 12 and len(r["visible_ranks"]) == 3
        assert r["top1_visible"] == (1 in r["visible_ranks"])
        assert (r["adversarial_rank"] == 1) == (r["top3"][0] == r["adversarial_class"])
    assert s["asr"] <= s["adversarial_in_top3"]
