import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vim_core.config import ConfigError, apply_overrides, load_params, parse_params
from vim_core.config.transformer import PRESETS, TransformerModelConfig

REPO = Path(__file__).resolve().parents[3]


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.image_size == 32
    assert params.data.source.kind == "embedded_mnist"


@pytest.mark.parametrize(
    "raw, path, rule",
    [
        ({"data": {"image_sise": 32}}, "data.image_sise", "Extra inputs are not permitted"),
        ({"data": {"image_size": "big"}}, "data.image_size", "valid integer"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "less than 1"),
        ({"data": {"channels": 2}}, "data.channels", "1 or 3"),
        ({"data": {"val_fraction": -0.1}}, "data.val_fraction", "greater than or equal to 0"),
        ({"data": {"test_fraction": 0.5, "val_fraction": 0.5}}, "data", "leaves no train split"),
        ({"data": {"source": {"kind": "image_folder"}}}, "data.source", "url is required"),
        (
            {"data": {"source": {"kind": "embedded_mnist", "url": "s3://x/y"}}},
            "data.source",
            "url must be empty",
        ),
        ({"bogus": 1}, "bogus", "Extra inputs"),
        ({"schedule": {"cron": "every monday"}}, "schedule", "must have 5 fields"),
    ],
)
def test_bad_params_name_key_value_and_rule(raw, path, rule):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    line = next(line for line in info.value.lines if f" {path} = " in line)
    assert rule in line


def test_every_problem_gets_its_own_line():
    with pytest.raises(ConfigError) as info:
        parse_params({"data": {"channels": 2, "test_fraction": 0.0, "extra": 1}})
    assert len(info.value.lines) == 3
    assert all(line.startswith("params.yaml: data.") for line in info.value.lines)


def _vim(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "vim_core.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_check_params_cli_ok_and_broken(tmp_path):
    ok = _vim("check-params", str(REPO / "params.yaml"))
    assert ok.returncode == 0, ok.stderr
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["image_size"] = 4
    raw["data"]["shard_sz"] = 10
    broken = tmp_path / "params.yaml"
    broken.write_text(yaml.safe_dump(raw))
    res = _vim("check-params", str(broken))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert any("data.image_size = 4" in line and "greater than or equal to 8" in line for line in lines)
    assert any("data.shard_sz" in line for line in lines)
    assert "Traceback" not in res.stderr


def test_check_params_cli_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed\n")
    res = _vim("check-params", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr
    res = _vim("check-params", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "file not found" in res.stderr


def test_overrides_set_dotted_keys_and_revalidate():
    params = load_params(REPO / "params.yaml")
    out = apply_overrides(
        params, ["tokenizer.train.steps=900", "tokenizer.model.l2_normalize=false", "evaluate.cfg_scale=null"]
    )
    assert (out.tokenizer.train.steps, out.tokenizer.model.l2_normalize, out.evaluate.cfg_scale) == (
        900,
        False,
        None,
    )
    assert params.tokenizer.train.steps == 600  # the input is not changed
    assert out.transformer == params.transformer


@pytest.mark.parametrize(
    "item, says",
    [
        ("tokenizer.train.steps=3", "warmup_steps (50) must be below"),
        ("tokenizer.model.codebook_sise=8", "codebook_sise = 8: Extra inputs are not permitted"),
        ("tokenizer.model.encoder.dim=8", "'encoder' is not a section"),
        ("tokenizer.train.steps", "is not KEY=VALUE"),
        ("seed=[1", "is not a YAML value"),
    ],
)
def test_bad_overrides_give_one_line(item, says):
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_params(REPO / "params.yaml"), [item])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_paper_config_is_valid_and_holds_the_papers_recipe():
    p = load_params(REPO / "configs" / "paper_ss_imagenet256.yaml")
    tok, vim = p.tokenizer, p.transformer
    assert (p.data.image_size, tok.model.patch_size, tok.model.codebook_size, tok.model.code_dim) == (
        256,
        8,
        8192,
        32,
    )
    assert tok.model.encoder_config().dim == 512 and tok.model.decoder_config().blocks == 8  # SS
    assert (tok.model.dead_code_threshold, tok.model.codebook_init) == (0.0, "normal")  # no remedies
    assert (tok.train.steps, tok.train.batch_size, tok.train.schedule.peak_lr) == (500_000, 256, 1e-4)
    assert (vim.resolved_model().layers, vim.resolved_model().dim, vim.train.steps) == (24, 1536, 450_000)
    assert vim.train.schedule.peak_lr == 4.5e-4 and vim.probe.block == 9  # 0-based: the paper's 10th
    assert vim.model == "vim-base" and vim.resolved_model().cfg_dropout == 0.0  # the paper: no label dropout


def test_paper_probe_config_is_the_unsupervised_variant():
    """Same recipe, but an unconditional VIM-Base and no perceptual (ImageNet-supervised VGG) loss."""
    sup = load_params(REPO / "configs" / "paper_ss_imagenet256.yaml")
    p = load_params(REPO / "configs" / "paper_ss_imagenet256_probe.yaml")
    model = p.transformer.resolved_model()
    assert model.num_classes == 0 and p.tokenizer.loss.perceptual_weight == 0.0
    assert model.model_dump(exclude={"num_classes"}) == sup.transformer.resolved_model().model_dump(
        exclude={"num_classes"}
    )
    assert p.transformer.train == sup.transformer.train and p.transformer.probe.block == 9
    assert p.tokenizer.model == sup.tokenizer.model and p.tokenizer.train == sup.tokenizer.train


def test_label_dropout_is_a_training_choice_not_a_preset_default():
    # The embedded default trains exactly the model it trained before the knob moved to train.
    vim = load_params(REPO / "params.yaml").transformer
    assert vim.model == "tiny" and vim.train.cfg_dropout == 0.1
    assert vim.resolved_model() == TransformerModelConfig(
        layers=4, heads=4, dim=192, mlp_dim=768, dropout=0.0, num_classes=10, cfg_dropout=0.1
    )
    # Presets name shapes only; a section that does not say gets the paper's choice, none.
    assert all("cfg_dropout" not in type(p).model_fields for p in PRESETS.values())
    assert (
        parse_params({"transformer": {"model": "vim-base"}}).transformer.resolved_model().cfg_dropout == 0.0
    )
    explicit = {"layers": 2, "heads": 2, "dim": 32, "mlp_dim": 64, "num_classes": 10}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["transformer"]["model"], raw["transformer"]["train"]["cfg_dropout"] = explicit, 0.3
    assert parse_params(raw).transformer.resolved_model().cfg_dropout == 0.3
    # Naming it under model is refused with a pointer, one line with the key path.
    with pytest.raises(ConfigError) as err:
        parse_params({"transformer": {"model": {**explicit, "cfg_dropout": 0.3}}})
    assert err.value.lines == [
        "params.yaml: transformer.model = {...}: cfg_dropout is a training choice: "
        "set it as transformer.train.cfg_dropout"
    ]
    # An explicit architecture survives the --set round trip (model_dump, then validate again).
    out = apply_overrides(
        parse_params(raw), ["transformer.model.layers=3", "transformer.train.cfg_dropout=0.5"]
    )
    assert (out.transformer.resolved_model().layers, out.transformer.resolved_model().cfg_dropout) == (3, 0.5)


def test_the_unconditional_copy_is_the_vim_unconditional_in_folders_of_its_own():
    vim = load_params(REPO / "params.yaml").transformer
    copy = vim.uncond_section()
    assert copy.resolved_model() == TransformerModelConfig(
        layers=4, heads=4, dim=192, mlp_dim=768, dropout=0.1, num_classes=0, cfg_dropout=0.0
    )
    assert (copy.train.steps, copy.train.schedule.peak_lr, copy.uncond) == (1000, 1e-3, None)
    assert copy.train.batch_size == vim.train.batch_size and copy.train.select == vim.train.select
    assert (copy.out_dir, copy.checkpoint_dir) == (
        "models/transformer/uncond",
        "checkpoints/transformer/uncond",
    )
    assert vim.model_copy(update={"uncond": None}).uncond_section() is None
    unconditional = {"layers": 2, "heads": 2, "dim": 32, "mlp_dim": 64, "num_classes": 0}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["transformer"]["model"] = unconditional
    assert parse_params(raw).transformer.uncond_section() is None  # it draws its samples itself
    raw["transformer"]["uncond"]["steps"] = 20  # the schedule decays from step 30
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert err.value.lines[0].startswith("params.yaml: transformer.uncond = {...}: decay_start (30) must be")


def test_check_params_agrees_with_dvc_yaml(tmp_path):
    """Every params key that dvc.yaml's stages name must be in the file: `dvc repro` cannot run without it."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    res = _vim("check-params", str(empty))
    assert res.returncode == 2 and res.stderr.strip() == f"error: {empty}: <root>: the file is empty"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["evaluate"], raw["transformer"]["sampling"]
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(raw))
    res = _vim("check-params", str(partial))
    assert res.returncode == 2, res.stdout
    assert res.stderr.strip().splitlines() == [
        f"error: {partial}: evaluate.classifier: missing; dvc.yaml's stage train_classifier reads it",
        f"error: {partial}: evaluate.classifier_dir: missing; dvc.yaml's stage train_classifier, "
        "evaluate_tokenizer reads it",
        f"error: {partial}: evaluate.kid_subset_size: missing; dvc.yaml's stage evaluate_tokenizer reads it",
        f"error: {partial}: evaluate: missing; dvc.yaml's stage evaluate reads it",
        f"error: {partial}: transformer.sampling: missing; dvc.yaml's stage evaluate reads it",
    ]
    # a dvc.yaml beside the file is the one that counts
    (tmp_path / "dvc.yaml").write_text("stages:\n  only: {cmd: 'true', params: [seed]}\n")
    assert _vim("check-params", str(partial)).returncode == 0


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", ""])
def test_unknown_time_zone_is_refused_at_its_key(zone):
    with pytest.raises(ConfigError) as info:
        parse_params({"schedule": {"timezone": zone}})
    assert info.value.lines == [
        f"params.yaml: schedule.timezone = {zone!r}: unknown IANA time zone {zone!r} (e.g. UTC, Europe/Paris)"
    ]
    assert parse_params({"schedule": {"timezone": "Europe/Paris"}}).schedule.timezone == "Europe/Paris"


@pytest.mark.parametrize(
    "raw, line",
    [
        (
            {"tokenizer": {"model": {"encoder": "huge"}}},
            "params.yaml: tokenizer.model.encoder = 'huge': unknown ViT preset 'huge'",
        ),
        (
            {"tokenizer": {"model": {"decoder": "huge"}}},
            "params.yaml: tokenizer.model.decoder = 'huge': unknown ViT preset 'huge'",
        ),
        (
            {"transformer": {"model": "vim-huge"}},
            "params.yaml: transformer.model = 'vim-huge': unknown VIM preset",
        ),
    ],
)
def test_unknown_preset_names_its_key_path(raw, line):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(line)
