"""launch.recipe: stage 1 -> 2 -> 3 chained through init_from on the test model, held-out losses while
training, evaluation with chance and blank-image baselines in eval.json, the loss figure, and a re-run that
resumes instead of training again."""
import json

import pytest

from experiments import registry
from launch import recipe

ARGS = ["--model=test", "--stage_set", "1:steps=2", "--stage_set", "2:steps=2", "--stage_set", "3:steps=2",
        "--set", "eval_every=2", "--set", "eval_samples=1",
        "--eval_after", "3", "--eval_num", "2", "--eval_kinds", "caption,count", "--max_new_tokens", "4"]


@pytest.mark.slow
def test_stages_chain_and_report(tmp_path, capsys):
    workdir = str(tmp_path / "pipe")
    exps = recipe.stage_experiments("test", workdir, (), ("1:steps=2", "2:steps=2", "3:steps=2"))
    assert [e.stage for e in exps] == [1, 2, 3]
    assert exps[0].init_from == "" and exps[1].init_from == exps[0].checkpoint_dir
    assert exps[2].init_from == exps[1].checkpoint_dir and all(e.num_steps == 2 for e in exps)

    report = recipe.main(ARGS + ["--workdir", workdir])
    assert [report["stages"][k]["steps"] for k in (1, 2, 3)] == [2, 2, 2]
    ev = report["stages"][3]["eval"]
    assert ev["chat"] and set(ev["accuracy"]) == set(ev["chance"]) == set(ev["accuracy_blank_images"])
    assert "eval" not in report["stages"][2]
    assert json.loads((tmp_path / "pipe" / "eval.json").read_text())["stages"]["3"]["steps"] == 2
    assert "blank images" in capsys.readouterr().out
    # each stage's held-out loss covers the data kinds of its own mixture
    for k in (1, 2, 3):
        kinds = {n.split(":")[1] for n, _ in registry.get_experiment(f"stage{k}", "test").data.mixture}
        assert {n.split("/")[1] for n in report["stages"][k]["heldout_loss"] if n.startswith("kind/")} == kinds
    assert (tmp_path / "pipe" / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logs = [tmp_path / "pipe" / f"stage{k}" / "losses.jsonl" for k in (1, 2, 3)]
    before = [p.read_text() for p in logs]
    again = recipe.main(ARGS + ["--workdir", workdir, "--eval_after", ""])     # finished stages: not retrained
    assert [again["stages"][k]["steps"] for k in (1, 2, 3)] == [2, 2, 2]
    assert [p.read_text() for p in logs] == before                              # no step was run again
    assert capsys.readouterr().out.count("nothing to train") == 3
    assert again["stages"][3]["heldout_loss"] == report["stages"][3]["heldout_loss"]   # read back from the run


def test_bad_stage_set_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="STAGE:key=value"):
        recipe.stage_experiments("test", str(tmp_path), (), ("4:steps=2",))
    with pytest.raises(SystemExit):
        recipe.main(["--model=test", "--workdir", str(tmp_path), "--eval_after", "5"])
    err = capsys.readouterr().err
    assert "--eval_after" in err and "1, 2, 3" in err
