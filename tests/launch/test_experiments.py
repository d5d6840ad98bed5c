"""Experiment registry: the paper's stages per size, typed --set overrides on any frozen config, the shared
CLI flags, clear errors."""
import pytest
from absl import flags as absl_flags

from experiments import flags, registry
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.model.config import get_config


@pytest.mark.parametrize("model", ["2b", "7b", "72b", "tiny", "test"])
def test_stages_follow_the_paper(model):
    e1, e2, e3 = (registry.get_experiment(f"stage{i}", model) for i in (1, 2, 3))
    assert e1.trainable == ("vision_tower", "merger")          # ViT only, LLM frozen
    assert e2.trainable == ("vision_tower", "merger", "llm")   # everything
    assert e3.trainable == ("merger", "llm")                   # ViT tower frozen
    assert isinstance(e1.data, DataConfig) and e1.model.name == model
    kinds = [{n.split(":")[1] for n, _ in e.data.mixture} for e in (e1, e2, e3)]
    assert kinds[0] == {"caption", "ocr", "count"}
    assert {"interleaved", "video", "grounding"} <= kinds[1] and kinds[2] == {"chat"}
    if model in ("2b", "7b", "72b"):
        assert e1.token_budget == 600_000_000_000 and e2.token_budget == 800_000_000_000
        assert (e1.data.seq_len, e2.data.seq_len, e3.data.seq_len) == (8192, 16384, 32768)
        assert e1.model.dtype == "bfloat16" and e1.model.param_dtype == "float32"
        assert e1.num_steps == -(-600_000_000_000 // (e1.batch_size * 8192))
    else:
        assert e1.num_steps <= 200 and e1.model.dtype == "float32"


def test_overrides_are_typed_and_nested():
    e = registry.get_experiment("stage2", "tiny", [
        "optim.peak_lr=3e-4", "batch_size=16", "mesh.fsdp=2", "mesh.data=-1", "model.remat_policy=full",
        "checkpoint.async_save=false", "data.mixture=(('synthetic:caption', 1), ('synthetic:video', 2))",
        "trainable=('merger','llm')", "steps=7", "workdir=/tmp/x", "data.seq_len=256"])
    assert e.optim.peak_lr == 3e-4 and e.batch_size == 16 and e.mesh.fsdp == 2
    assert e.model.remat_policy == "full" and e.checkpoint.async_save is False
    assert e.data.mixture == (("synthetic:caption", 1.0), ("synthetic:video", 2.0))
    assert e.trainable == ("merger", "llm") and e.num_steps == 7 and e.run_dir == "/tmp/x"
    assert e.tokens_per_step == 16 * 256
    sc = e.step_config()
    assert sc.optim.total_steps == 7 and sc.trainable == ("merger", "llm")
    assert "optim.peak_lr = 0.0003" in registry.describe(e)


@pytest.mark.parametrize("item, words", [
    ("optim.peak_lrr=1", ["peak_lrr", "peak_lr", "warmup_steps"]),
    ("nosuch=1", ["nosuch", "batch_size", "optim"]),
    ("model.remat_policy=sometimes", ["sometimes", "full", "dots"]),
    ("model.attention_impl=flash", ["flash", "cudnn", "splash"]),
    ("batch_size=many", ["batch_size", "int", "many"]),
    ("checkpoint.async_save=maybe", ["maybe", "true", "false"]),
    ("stage=4", ["stage", "1, 2, 3"]),
    ("trainable=('vit',)", ["vit", "vision_tower", "merger", "llm"]),
    ("data.mixture=(('web:foo', 1.0),)", ["web:foo", "synthetic"]),
    ("optim=1", ["optim.peak_lr"]),
    ("optim.peak_lr.x=1", ["peak_lr", "float"]),
    ("batch_size", ["key=value"]),
    ("microbatches=3", ["batch_size", "microbatches=3"]),
])
def test_override_errors_name_the_choices(item, words):
    with pytest.raises(ValueError) as e:
        registry.get_experiment("stage1", "tiny", [item])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_experiment_and_model():
    with pytest.raises(ValueError, match="stage1, stage2, stage3"):
        registry.get_experiment("stage4")
    with pytest.raises(ValueError, match="tiny"):
        registry.get_experiment("stage1", "13b")
    names = [n for n, _ in registry.list_experiments()]
    assert names == ["stage1", "stage2", "stage3"]


def test_overrides_apply_to_any_frozen_config():
    """The one --set parser also edits a ModelConfig (launch.evaluate, launch.probe_vision): typed values,
    nested configs, tuples with or without brackets, and the valid fields in the error."""
    base = get_config("test")
    cfg = registry.apply_overrides(base, ["attention_impl=cudnn", "vision.depth=2", "rms_norm_eps=1e-5",
                                          "tie_word_embeddings=false"])
    assert (cfg.attention_impl, cfg.vision.depth, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        "cudnn", 2, 1e-5, False)
    assert registry.apply_overrides(base, [f"mrope_section={','.join(map(str, base.mrope_section))}"]) == base
    assert cfg.replace(attention_impl=base.attention_impl, vision=base.vision, rms_norm_eps=base.rms_norm_eps,
                       tie_word_embeddings=base.tie_word_embeddings) == base     # nothing else changed
    with pytest.raises(ValueError, match="ModelConfig has no field 'hiden_size'; valid: .*hidden_size"):
        registry.apply_overrides(base, ["hiden_size=3"])
    with pytest.raises(ValueError, match="sometimes.*valid.*full"):
        registry.apply_overrides(base, ["remat_policy=sometimes"])


def _flag_values():
    fv = absl_flags.FlagValues()
    flags.define_experiment(fv)
    flags.define_model(fv)
    flags.define_set(fv)
    flags.define_list(fv, "kinds", ("caption",), ("caption", "ocr"), "kinds")
    absl_flags.DEFINE_bool("chat", False, "", flag_values=fv)
    return fv


def test_cli_flags_parse_from_defaults_and_name_the_choices(capsys):
    fv = _flag_values()
    flags.parse(fv, ["--experiment=stage2", "--model", "test", "--set", "a=1", "--set=b=2", "--kinds=", "--chat"])
    assert (fv.experiment, fv.model, fv.set, fv.kinds, fv.chat) == ("stage2", "test", ["a=1", "b=2"], [], True)
    flags.parse(fv, ["--set=c=3"])                     # a second parse starts from the defaults again
    assert (fv.experiment, fv.model, fv.set, fv.kinds, fv.chat) == ("stage1", "tiny", ["c=3"], ["caption"], False)
    for argv, words in ((["--model=13b"], ["13b", "test|tiny|2b|7b|72b"]),
                        (["--experiment=stage4"], ["stage1|stage2|stage3"]),
                        (["--kinds=caption,video"], ["caption, ocr"]),
                        (["--modle=tiny"], ["modle", "--model", "--set", "--kinds"]),
                        (["tiny"], ["unexpected", "tiny"])):
        with pytest.raises(SystemExit) as e:
            flags.parse(fv, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("ERROR: ") and err.count("\n") == 1, err
        for w in words:
            assert w in err, (w, err)
    with pytest.raises(SystemExit) as e:
        flags.parse(fv, ["--help"], "the doc")
    assert e.value.code == 0 and "the doc" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_patch_budget_matches_the_embedded_data(stage):
    """The tiny recipe's patches-per-row follows the mixture's measured patch/token ratio (within 15%),
    so neither budget binds early and packing stays efficient."""
    from qwen2vl_jax.data import pipeline, tokenizer
    exp = registry.get_experiment(f"stage{stage}", "tiny")
    measured = pipeline.balanced_max_patches(exp.data, exp.model, tokenizer.load_tokenizer("embedded"),
                                             num_samples=64)
    assert abs(exp.data.max_patches - measured) <= 0.15 * measured, (exp.data.max_patches, measured)


def test_coupled_model_fields_can_be_overridden_together():
    """--set values are applied together: a model shape whose fields must agree (hidden size, the ViT's output
    size, M-RoPE sections) is reachable from the command line; alone, the same change is a clear error."""
    sets = ["model.hidden_size=384", "model.vision.out_hidden_size=384", "model.mrope_section=(12,18,18)",
            "optim.peak_lr=1e-4", "optim.peak_lr=3e-4"]
    exp = registry.get_experiment("stage2", "tiny", sets)
    assert (exp.model.hidden_size, exp.model.vision.out_hidden_size, exp.model.head_dim) == (384, 384, 96)
    assert exp.optim.peak_lr == 3e-4                               # the later value of a key wins
    with pytest.raises(ValueError, match=r"model.hidden_size='384'.*mrope_section"):
        registry.get_experiment("stage2", "tiny", ["model.hidden_size=384"])


# Chips of each v5p slice the registry names, counted by hand: v5p-N counts TensorCores, two per chip.
SLICE_CHIPS = {"v5p-64": 32, "v5p-128": 64, "v5p-256": 128, "v5p-512": 256}


@pytest.mark.parametrize("model", ["2b", "7b", "72b"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_tpu_layout_divides_the_batch_over_its_slice(model, stage):
    """The paper sizes' TPU defaults are consistent with their slice: the mesh spans exactly its chips,
    the microbatches divide the batch, and every microbatch gives each batch shard (data x fsdp) the same
    whole number of rows. The issue's two slices are the ones named: 72B stage 2 on v5p-256, stage 3 on
    v5p-512."""
    from qwen2vl_jax.train.sharding import MESH_AXES
    exp = registry.get_experiment(f"stage{stage}", model)
    chips = SLICE_CHIPS[exp.topology]
    mesh = dict(zip(MESH_AXES, exp.mesh.shape(chips)))
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] * mesh["sequence"] == chips
    assert exp.batch_size % exp.microbatches == 0
    rows = exp.batch_size // exp.microbatches
    assert rows % (mesh["data"] * mesh["fsdp"]) == 0 and rows >= mesh["data"] * mesh["fsdp"]
    assert exp.model.remat_policy in ("full", "dots_attention") and exp.model.attention_impl == "auto"
    if model == "72b":
        assert exp.topology == {1: "v5p-256", 2: "v5p-256", 3: "v5p-512"}[stage]
    if model == "2b":
        assert mesh["tensor"] == 1 and mesh["fsdp"] == 32            # fsdp only
    # an override still wins over the layout
    assert registry.get_experiment(f"stage{stage}", model, ["microbatches=2"]).microbatches == 2
