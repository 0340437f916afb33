"""bench/check_full.py: its overrides are valid for every step of each recipe, and its timing and
memory accounting attribute a step's cost to that step (the check itself: `make check-full`)."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from bench import check_full
from tests.conftest import ROOT
from utils.config import load_config
from utils.errors import InputError


@pytest.mark.parametrize("pipeline", check_full.PIPELINES)
def test_overrides_load_with_every_config_of_the_recipe(pipeline):
    """train.sh passes the check's overrides to every step: each config it loads must take them."""
    configs = sorted((ROOT / "config" / pipeline).glob("*.yaml"))
    check = check_full.CHECKS[pipeline]
    for path in configs:
        cfg = load_config(path, ["profile=full", "device=cpu", *check.overrides])
        assert cfg.profile == "full" and cfg.get("train.stop_after") in (None, 1)
    trainer = dict(o.split("=") for o in check.overrides).get("nnunet.trainer")
    if trainer is not None:  # found by nnU-Net in models/nnunet_trainers/
        trainers = (ROOT / "models" / "nnunet_trainers" / "short_trainers.py").read_text()
        assert f"class {trainer}(" in trainers


def test_step_names_come_from_train_sh_markers():
    assert check_full.step_name("=== [12:03:04] 3. stage 1 (vertebra box + ratios), all folds") == (
        "3. stage 1 (vertebra box + ratios), all folds"
    )
    assert check_full.step_name("=== [12:03:04] 1. preprocess: DICOM -> out/prep") == (
        "1. preprocess"
    )
    assert check_full.step_name("+ nnUNetv2_train 501 2d 0") is None
    assert 'step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }' in (ROOT / "train.sh").read_text()


def _script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "recipe.sh"
    path.write_text(textwrap.dedent(body))
    return ["bash", str(path)]


def test_each_step_gets_its_own_seconds_and_memory(tmp_path):
    """A step whose child process holds 300 MB is charged for it; the step before is not."""
    hold = f"{sys.executable} -c 'import time; b = bytearray(300_000_000); time.sleep(2.5)'"
    cmd = _script(
        tmp_path,
        f"""
        echo "=== [00:00:00] 1. small: nothing"
        sleep 1.5
        echo "=== [00:00:01] 2. large"
        {hold}
        """,
    )
    log = tmp_path / "recipe.log"
    steps = check_full.run_steps("toy", cmd, {}, log, time.monotonic() + 60, "start")
    assert [s.name for s in steps] == ["1. small", "2. large"]
    small, large = steps
    assert 1.2 < small.seconds < 2.5 and 2.2 < large.seconds < 4.0
    assert large.pss > 300e6 > small.pss and large.rss > 300e6
    assert "2. large" in log.read_text()
    text = check_full.table(steps, {"toy": 4.0})
    assert "| toy | 2. large | 3 |" in text and "| toy | **total** | **4** |" in text


def test_a_failing_or_overlong_step_is_one_error_naming_it(tmp_path):
    log = tmp_path / "recipe.log"
    failing = _script(tmp_path, 'echo "=== [00:00:00] 4. train"\nexit 3\n')
    with pytest.raises(InputError, match=f"toy: '4. train' failed with code 3; see {log}"):
        check_full.run_steps("toy", failing, {}, log, time.monotonic() + 60, "start")
    hanging = _script(tmp_path, 'echo "=== [00:00:00] 5. hang"\nsleep 30\n')
    t0 = time.monotonic()
    with pytest.raises(InputError, match="toy: stopped at the time limit during '5. hang'"):
        check_full.run_steps("toy", hanging, {}, log, time.monotonic() + 1.5, "start")
    assert time.monotonic() - t0 < 10
