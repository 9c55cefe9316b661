"""`sisa train --core-ids` and `sisa add --core-ids`: a core-set backbone from the CLI, its mistakes refused."""

import json
from pathlib import Path

import numpy as np
import pytest

from sisa.cli.main import main
from tests.conftest import blobs, nearest_centroid_accuracy, npz_config, store_digest

pytestmark = pytest.mark.usefixtures("ray_session")

BACKBONE = ["backbone.source=core", "backbone.name=mlp", "backbone.hidden=[8]", "model.adapter=head"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> dict:
    assert main([*argv, "--json"]) == code
    return json.loads(capsys.readouterr().out)


def test_train_with_core_ids_then_rerun_add_status_and_a_refused_core_deletion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, store = npz_config(tmp_path, "lr: 0.01", held_out=True), tmp_path / "st"
    core = tmp_path / "core.txt"
    core.write_text("# consented samples\n" + "\n".join(map(str, range(0, 300, 5))) + "\n")
    train = ["train", "--config", str(config), "--store", str(store), "--core-ids", str(core), *BACKBONE]
    first = run_json(capsys, *train)
    assert first["ingested"] == 300
    # Held-out accuracy against a reference fitted in the same run on the same 300 samples (no
    # fixed number: kernels differ between machines): a head on the core-trained backbone is
    # about as good as a nearest-centroid classifier of the raw features, or better.
    fit_on, held_out = np.load(tmp_path / "train.npz"), np.load(tmp_path / "test.npz")
    reference = nearest_centroid_accuracy(fit_on["x"], fit_on["y"], held_out["x"], held_out["y"])
    assert first["accuracy"] >= reference - 0.1
    status = run_json(capsys, "status", "--store", str(store))
    assert status["backbone"]["core_samples"] == 60 and status["backbone"]["stored"]["bytes"] > 0
    # The same command again (after a kill, say) finds everything done; another core set is refused.
    again = run_json(capsys, *train)
    assert again["trained"] == {} and again["ingested"] == 0
    other = tmp_path / "other.txt"
    other.write_text("1\n2\n")
    before = store_digest(store)
    assert main([*train[:5], "--core-ids", str(other), *BACKBONE]) == 2
    assert "another core set" in capsys.readouterr().err
    assert main(["delete", "--store", str(store), "--ids", "5"]) == 2
    assert "core set" in capsys.readouterr().err
    assert store_digest(store) == before
    # New core samples through `add`: a new backbone, and every shard retrained from its first stage.
    x, y = blobs(20, d=6, seed=9)
    np.savez(tmp_path / "more.npz", x=x, y=y, ids=np.arange(1000, 1020))
    (tmp_path / "more_core.txt").write_text("1000\n1001\n")
    added = run_json(
        capsys,
        "add",
        "--store",
        str(store),
        "--input",
        str(tmp_path / "more.npz"),
        "--core-ids",
        str(tmp_path / "more_core.txt"),
    )
    assert sorted(added["trained"]) == ["0", "1"] and all(stages[0] == 1 for stages in added["trained"].values())
    after = run_json(capsys, "status", "--store", str(store))
    assert after["backbone"]["core_samples"] == 62
    assert after["backbone"]["stored"]["digest"] != status["backbone"]["stored"]["digest"]
    assert run_json(capsys, "verify", "--store", str(store))["ok"]


@pytest.mark.parametrize(
    ("extra", "core_lines", "message"),
    [
        ([], None, "give their ids with --core-ids FILE"),
        ([], "5\n99999\n", "not ids of the training data"),
        (["backbone.source=none", "model.adapter=none"], "5\n", "backbone.source is none"),
        (["backbone.source=pretrained", "backbone.name=no_such_module:build"], None, "cannot be imported"),
        (["model.adapter=lora", "model.targets=['0']"], "5\n", "names no LoRA-adaptable layer"),
    ],
)
def test_train_mistakes_leave_no_store_behind(
    extra: list[str], core_lines: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, store = npz_config(tmp_path), tmp_path / "st"
    argv = ["train", "--config", str(config), "--store", str(store), *BACKBONE, *extra]
    if core_lines is not None:
        (tmp_path / "core.txt").write_text(core_lines)
        argv += ["--core-ids", str(tmp_path / "core.txt")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not store.exists()
