import pytest

from easynlp_ldm.args import Param, parse_bool, parse_flags, parse_user_defined_parameters
from easynlp_ldm.errors import UserError

PARAMS = [
    Param("write_image", bool, False, "write files"),
    Param("n_samples", int, 4, "images per prompt"),
    Param("scale", float, 5.0, "guidance", aliases=("guidance_scale",)),
    Param("image_prefix", str, "./", "folder"),
    Param("negative_prompt", str, "", "negative"),
    Param("n_iter", int, 1, "iterations", modes=frozenset({"predict"})),
]


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("False", False), ("0", False)])
def test_bool_spellings(text, value):
    assert parse_bool(text) is value
    values, _ = parse_user_defined_parameters(f"write_image={text}", PARAMS, "predict")
    assert values["write_image"] is value


def test_false_string_is_false_unlike_easynlp():
    values, _ = parse_user_defined_parameters("write_image=False", PARAMS, "predict")
    assert values["write_image"] is False


def test_multiline_whitespace_and_types_and_defaults():
    text = "\nn_samples=2\n  write_image=True\timage_prefix=./output/\n"
    values, notes = parse_user_defined_parameters(text, PARAMS, "predict")
    assert values == {"write_image": True, "n_samples": 2, "scale": 5.0, "image_prefix": "./output/",
                      "negative_prompt": "", "n_iter": 1}
    assert notes == []


def test_value_may_contain_equals_and_quotes():
    values, _ = parse_user_defined_parameters('image_prefix=a=b negative_prompt="模糊 低质量"', PARAMS, "predict")
    assert values["image_prefix"] == "a=b"
    assert values["negative_prompt"] == "模糊 低质量"


def test_alias_maps_to_canonical_name():
    values, _ = parse_user_defined_parameters("guidance_scale=7.5", PARAMS, "predict")
    assert values["scale"] == 7.5


def test_unknown_key_names_key_and_lists_valid_keys():
    with pytest.raises(UserError) as err:
        parse_user_defined_parameters("n_sample=2", PARAMS, "predict")
    message = str(err.value)
    assert "'n_sample'" in message and "did you mean n_samples" in message
    assert "valid keys: image_prefix, n_iter, n_samples, negative_prompt, scale, write_image" in message


@pytest.mark.parametrize("text,key", [("n_samples=two", "n_samples"), ("scale=high", "scale"),
                                      ("write_image=yesplease", "write_image"), ("n_samples=2.5", "n_samples")])
def test_wrong_type_is_an_error_naming_key(text, key):
    with pytest.raises(UserError) as err:
        parse_user_defined_parameters(text, PARAMS, "predict")
    assert key in str(err.value) and "valid keys" in str(err.value)


def test_not_key_value_and_duplicates():
    with pytest.raises(UserError, match="not key=value"):
        parse_user_defined_parameters("write_image", PARAMS, "predict")
    with pytest.raises(UserError, match="given twice"):
        parse_user_defined_parameters("scale=1 guidance_scale=2", PARAMS, "predict")


def test_param_for_other_mode_is_noted_not_silent():
    _, notes = parse_user_defined_parameters("n_iter=2", PARAMS, "train")
    assert notes == ["user-defined parameter n_iter has no effect in --mode=train"]


def test_flag_defaults_and_aliases():
    flags = parse_flags([])
    assert flags.mode == "train" and flags.random_seed == 1234 and flags.micro_batch_size == 2
    assert flags.learning_rate == 5e-5 and flags.weight_decay == 1e-4 and flags.max_grad_norm == 1.0
    assert flags.optimizer_type == "AdamW" and flags.warmup_proportion == 0.1 and flags.logging_steps == 100
    assert flags.sequence_length == 16 and flags.epoch_num == 3.0 and flags.data_threads == 10
    assert flags.worker_gpu == -1 and flags.worker_count == 1 and flags.use_amp is False
    flags = parse_flags(["--train_batch_size=8", "--checkpoint_path", "x", "--wd=0.5", "--mn=2", "--optimizer=SGD"])
    assert flags.micro_batch_size == 8 and flags.checkpoint_dir == "x" and flags.weight_decay == 0.5
    assert flags.max_grad_norm == 2.0 and flags.optimizer_type == "SGD"
    assert flags.given == {"micro_batch_size", "checkpoint_dir", "weight_decay", "max_grad_norm", "optimizer_type"}


def test_store_true_flags_accept_bare_and_explicit_values():
    assert parse_flags(["--use_amp"]).use_amp is True
    assert parse_flags(["--use_amp=False"]).use_amp is False
    assert parse_flags(["--skip_first_line", "true"]).skip_first_line is True


def test_unknown_flag_is_rejected():
    with pytest.raises(UserError, match="unrecognized arguments: --lerning_rate"):
        parse_flags(["--lerning_rate=1e-4"])


def test_unsupported_flag_rejected_with_reason_but_default_accepted():
    with pytest.raises(UserError, match="--ps_hosts is a PAI-TF"):
        parse_flags(["--ps_hosts=a:1"])
    flags = parse_flags(["--export_tf_checkpoint_type=easytransfer"])
    assert any("export_tf_checkpoint_type" in note for note in flags.notes)


def test_flag_with_no_effect_in_mode_is_noted():
    flags = parse_flags(["--mode=predict", "--save_checkpoint_steps=500", "--learning_rate=1e-4"])
    assert "--save_checkpoint_steps has no effect in --mode=predict" in flags.notes
    assert "--learning_rate has no effect in --mode=predict" in flags.notes


@pytest.mark.parametrize("argv", [["--mode=fly"], ["--micro_batch_size=0"], ["--epoch_num=0"],
                                  ["--warmup_proportion=2"], ["--random_seed=abc"]])
def test_bad_flag_values(argv):
    with pytest.raises(UserError):
        parse_flags(argv)


# EasyNLP's common parser (easynlp/utils/arguments.py, _add_easynlp_args): every flag with its aliases and default.
EASYNLP_COMMON_FLAGS = {
    "random_seed": 1234, "mode": "train", "user_script": None, "user_entry_file": None, "tables": None,
    "user_defined_parameters": None, "skip_first_line": False, "outputs": None, "buckets": None, "odps_config": None,
    "app_name": "text_classify", "distributed_backend": "nccl", "sequence_length": 16, "micro_batch_size": 2,
    "local_rank": None, "checkpoint_dir": None, "modelzoo_base_dir": "", "do_lower_case": False, "epoch_num": 3,
    "save_checkpoint_steps": None, "save_all_checkpoints": False, "learning_rate": 5e-5, "weight_decay": 1e-4,
    "max_grad_norm": 1.0, "optimizer_type": "AdamW", "warmup_proportion": 0.1, "logging_steps": 100,
    "gradient_accumulation_steps": 1, "resume_from_checkpoint": None, "input_schema": None, "first_sequence": None,
    "second_sequence": None, "label_name": None, "label_enumerate_values": None, "output_schema": "",
    "append_cols": None, "predict_slice_size": 4096, "predict_queue_size": 1024, "predict_thread_num": 2,
    "predict_table_read_thread_num": 16, "worker_count": 1, "worker_gpu": -1, "master_port": 23456,
    "worker_hosts": None, "use_amp": False, "use_torchacc": False, "data_threads": 10, "mg_model": False,
}
EASYNLP_ALIASES = {"train_batch_size": "micro_batch_size", "checkpoint_path": "checkpoint_dir", "wd": "weight_decay",
                   "mn": "max_grad_norm", "optimizer": "optimizer_type"}
# Accepted at their defaults only, with the reason: they need OSS/ODPS/PAI-TF, TorchAcc, user scripts or labels.
REFUSED_OTHERWISE = {"user_script", "user_entry_file", "buckets", "odps_config", "worker_hosts", "use_torchacc",
                     "label_name", "label_enumerate_values"}


def test_every_easynlp_common_flag_is_accepted_with_its_default():
    from easynlp_ldm.args import FLAGS_BY_DEST

    defaults = parse_flags([]).values
    for dest, default in EASYNLP_COMMON_FLAGS.items():
        assert dest in FLAGS_BY_DEST, dest
        if dest != "app_name":  # text_classify is not an app here; latent_diffusion is the default
            assert defaults[dest] == default, dest
        if default is not None:
            written = str(default).lower() if isinstance(default, bool) else str(default)
            parse_flags([f"--{dest}={written}"])  # its default, written out, is accepted
        assert (FLAGS_BY_DEST[dest].unsupported is not None) == (dest in REFUSED_OTHERWISE), dest
    for alias, dest in EASYNLP_ALIASES.items():
        assert f"--{alias}" in FLAGS_BY_DEST[dest].names


def test_mg_model_and_predictor_tuning_flags_take_any_value_and_are_noted():
    flags = parse_flags(["--mode=predict", "--mg_model", "--predict_thread_num=8", "--predict_slice_size=1",
                         "--predict_queue_size=2", "--predict_table_read_thread_num=3"])
    assert flags.mg_model is True and flags.predict_thread_num == 8
    for dest in ("mg_model", "predict_thread_num", "predict_slice_size", "predict_queue_size",
                 "predict_table_read_thread_num"):
        assert any(note.startswith(f"--{dest} is accepted and has no effect here") for note in flags.notes), dest
