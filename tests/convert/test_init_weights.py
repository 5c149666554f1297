"""OpenCLIP weights -> megapgs initial checkpoint: same embeddings, a bit-exact round trip, the
accepted file layouts, refusals of what megapgs's towers do not compute, no code run on load, and
the load into the training model (`train.init_from`)."""
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from megapgs.config import validate
from megapgs.convert.init_weights import (
    INIT_JSON,
    INIT_WEIGHTS,
    ConversionError,
    load_init_weights,
    load_openclip_state,
    megapgs_state,
    read_state_dict,
    write_init_checkpoint,
)
from megapgs.convert.openclip import build_openclip_model, from_openclip, openclip_model_cfg, to_openclip
from megapgs.models.archs import get_arch
from megapgs.models.clip import CLIP, build_model
from megapgs.models.text import eot_lengths
from megapgs.train.engine import InitWeightsError, load_init_from


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def openclip_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_openclip_model(get_arch("tiny-28")).eval()


def write_openclip_dir(folder, model, model_cfg=None, preprocess_cfg=None, weights="open_clip_model.safetensors"):
    """An OpenCLIP model directory as open_clip.create_model("local-dir:...") reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg or openclip_model_cfg(get_arch("tiny-28"))}
    if preprocess_cfg is not None:
        config["preprocess_cfg"] = preprocess_cfg
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape and torch.equal(got[key], value), key


def test_openclip_dir_to_init_checkpoint_gives_openclip_embeddings(tmp_path):
    theirs = openclip_tiny()
    original = theirs.state_dict()
    folder = write_openclip_dir(tmp_path / "openclip", theirs)
    source = load_openclip_state(f"local-dir:{folder}")
    assert source.spec.name == "tiny-28" and not source.has_logit_bias
    written = write_init_checkpoint(tmp_path / "init", "tiny-28", megapgs_state(source), source.describe())
    assert written == [tmp_path / "init" / INIT_WEIGHTS, tmp_path / "init" / INIT_JSON]
    meta = json.loads((tmp_path / "init" / INIT_JSON).read_text())
    assert (meta["arch"], meta["has_logit_bias"], meta["dtype"]) == ("tiny-28", False, "float32")
    assert meta["source"]["openclip_model"] == f"local-dir:{folder.resolve()}"
    assert sorted(p.name for p in (tmp_path / "init").iterdir()) == [INIT_JSON, INIT_WEIGHTS]  # no temp files left

    state, spec = load_init_weights(tmp_path / "init")
    assert spec == get_arch("tiny-28") and state["logit_scale"].shape == (1,)
    assert meta["model_cfg"] == openclip_model_cfg(spec)
    ours = CLIP(spec).eval()
    ours.load_state_dict(state)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(3, 16, dtype=torch.int64)
    for row, length in enumerate((2, 9, 16)):
        tokens[row, :length - 1] = torch.randint(1, 49406, (length - 1,), generator=torch.Generator().manual_seed(row))
        tokens[row, length - 1] = 49407
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images, normalize=True)) <= 1e-5
        text = ours.encode_text(tokens, eot_lengths(tokens))
        assert rel_err(text, theirs.encode_text(tokens, normalize=True)) <= 1e-5
    assert_same_state(to_openclip(state, original), original)


def test_plain_directory_and_overwrite(tmp_path):
    folder = write_openclip_dir(tmp_path / "openclip", openclip_tiny())
    for seed in (0, 1):  # writing over an initial checkpoint replaces it
        source = load_openclip_state(str(write_openclip_dir(folder, openclip_tiny(seed))))
        write_init_checkpoint(tmp_path / "init", "tiny-28", megapgs_state(source), source.describe())
        state, _ = load_init_weights(tmp_path / "init")
        assert_same_state(to_openclip(state, source.state), source.state)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not a megapgs initial checkpoint"):
        write_init_checkpoint(tmp_path / "other", "tiny-28", state, {})


@pytest.fixture(scope="module")
def vit_b16_state():
    torch.manual_seed(2)
    return {key: value.contiguous() for key, value in build_openclip_model(get_arch("ViT-B-16")).state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_named_architecture_with_a_state_dict_file(tmp_path, vit_b16_state, suffix):
    path = tmp_path / f"ViT-B-16{suffix}"
    save_file(vit_b16_state, str(path)) if suffix == ".safetensors" else torch.save(vit_b16_state, path)
    source = load_openclip_state("ViT-B-16", path)
    assert source.spec.name == "ViT-B-16" and source.model == "ViT-B-16"
    with torch.device("meta"):
        template = CLIP(get_arch("ViT-B-16")).state_dict()
    assert_same_state(megapgs_state(source), from_openclip(vit_b16_state, template))


def test_openclip_training_checkpoint_is_unwrapped(tmp_path):
    model = openclip_tiny()
    original = model.state_dict()
    wrapped = {"epoch": 4, "name": "run", "state_dict": {f"module.{k}": v for k, v in original.items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}
    folder = write_openclip_dir(tmp_path / "openclip", model, weights="open_clip_pytorch_model.bin")
    torch.save(wrapped, folder / "open_clip_pytorch_model.bin")
    source = load_openclip_state(str(folder))
    assert source.weights_file.name == "open_clip_pytorch_model.bin"
    assert_same_state(source.state, original)


TINY_CFG = openclip_model_cfg(get_arch("tiny-28"))
REFUSED = {
    # name: (model_cfg, preprocess_cfg, the option the message must name)
    "quick_gelu": ({**TINY_CFG, "quick_gelu": True}, None, "model_cfg.quick_gelu = true"),
    "attentional pooling": ({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "attentional_pool": True}}, None,
                            "model_cfg.vision_cfg.attentional_pool"),
    "no_ln_pre": ({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "no_ln_pre": True}}, None, "no_ln_pre"),
    "avg pooling": ({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "pool_type": "avg"}}, None, "pool_type"),
    "act_kwargs": ({**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "act_kwargs": {"approximate": "tanh"}}}, None,
                   "model_cfg.text_cfg.act_kwargs"),
    "eos pooling": ({**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "pool_type": "eos"}}, None, "text_cfg.pool_type"),
    "hf text tower": ({**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "hf_model_name": "bert-base"}}, None,
                      "hf_model_name"),
    "custom text": ({**TINY_CFG, "custom_text": True}, None, "model_cfg.custom_text"),
    "unknown option": ({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "rope": True}}, None, "vision_cfg.rope"),
    "grid that does not tile the image": ({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 30}},
                                          None, "model_cfg.vision_cfg.image_size = 30: not a multiple of"),
    "vocabulary smaller than the tokenizer's": (
        {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "vocab_size": 100}}, None,
        "model_cfg.text_cfg.vocab_size = 100"),
    "ImageNet mean": (TINY_CFG, {"mean": [0.485, 0.456, 0.406]}, "preprocess_cfg.mean"),
    "squash resize": (TINY_CFG, {"resize_mode": "squash"}, "preprocess_cfg.resize_mode"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_option_is_a_clear_error(tmp_path, name):
    model_cfg, preprocess_cfg, phrase = REFUSED[name]
    folder = write_openclip_dir(tmp_path / "openclip", openclip_tiny(), model_cfg, preprocess_cfg)
    with pytest.raises(ConversionError) as info:
        load_openclip_state(f"local-dir:{folder}")
    assert phrase in str(info.value) and "open_clip_config.json" in str(info.value)


def test_options_without_effect_are_accepted(tmp_path):
    cfg = {**TINY_CFG, "output_dict": True, "init_logit_scale": math.log(10),
           "vision_cfg": {**TINY_CFG["vision_cfg"], "patch_dropout": 0.5, "block_type": "default"}}
    openai_mean = {"mean": [0.48145466, 0.4578275, 0.40821073]}
    folder = write_openclip_dir(tmp_path / "openclip", openclip_tiny(), cfg, openai_mean)
    assert load_openclip_state(str(folder)).spec.name == "tiny-28"


def test_quickgelu_architecture_name_is_refused(tmp_path, vit_b16_state):
    save_file(vit_b16_state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match="quick_gelu = true"):
        load_openclip_state("ViT-B-16-quickgelu", tmp_path / "w.safetensors")


class WritesAFile:
    """Unpickling this object opens (creates) a file: the code a weights file must never run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickled_object_is_refused_and_runs_no_code(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(WritesAFile(proof)))  # the payload does run code when unpickled freely
    assert proof.exists()
    marker = tmp_path / "marker"
    state = {key: value for key, value in openclip_tiny().state_dict().items()}
    torch.save({**state, "hook": WritesAFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_openclip_state("ViT-B-16", tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    traced = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    torch.jit.save(traced, str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(ConversionError, match="is a TorchScript archive"):
        read_state_dict(tmp_path / "ViT-B-16.pt")


def test_weights_of_another_architecture_are_refused(tmp_path, vit_b16_state):
    save_file(vit_b16_state, str(tmp_path / "b16.safetensors"))
    wrong_shape = r"not the weights of ViT-B-32 .*: shape \(768, 3, 16, 16\) where \(768, 3, 32, 32\)"
    with pytest.raises(ConversionError, match=wrong_shape):
        megapgs_state(load_openclip_state("ViT-B-32", tmp_path / "b16.safetensors"))


def test_nothing_is_downloaded():
    with pytest.raises(ConversionError, match="downloads nothing"):
        load_openclip_state("ViT-B-16")  # a name alone would need OpenCLIP's download
    with pytest.raises(ConversionError, match="downloads nothing"):
        load_openclip_state("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")


# ----------------------------------------------------------------------------- train.init_from

@pytest.fixture()
def tiny_init(tmp_path):
    source = load_openclip_state(str(write_openclip_dir(tmp_path / "openclip", openclip_tiny())))
    write_init_checkpoint(tmp_path / "init", "tiny-28", megapgs_state(source), source.describe())
    return tmp_path / "init"


def train_config(tmp_path, **train):
    return validate({"data": {"source": "synthetic"}, "eval": {"zeroshot": False, "retrieval": False},
                     "train": {"output_dir": str(tmp_path / "run"), **train}})


def test_init_from_loads_the_weights(tmp_path, tiny_init):
    cfg = train_config(tmp_path, init_from=str(tiny_init))
    model = build_model(cfg.model)
    load_init_from(model, cfg, cfg.train.init_from)
    assert_same_state(model.state_dict(), load_init_weights(tiny_init)[0])


def test_siglip_from_clip_weights_keeps_the_fresh_logit_bias(tmp_path, tiny_init, caplog):
    cfg = train_config(tmp_path, init_from=str(tiny_init), loss="siglip")
    model = build_model(cfg.model, siglip=True)
    with caplog.at_level("INFO"):
        load_init_from(model, cfg, cfg.train.init_from)
    state, _ = load_init_weights(tiny_init)
    assert float(model.logit_bias.detach()) == -10.0 and torch.equal(model.logit_scale.detach(), state["logit_scale"])
    assert "kept the fresh logit_bias = -10" in caplog.text


def test_siglip_weights_do_not_go_into_a_clip_loss_model(tmp_path, tiny_init):
    state, _ = load_init_weights(tiny_init)
    write_init_checkpoint(tiny_init, "tiny-28", {**state, "logit_bias": torch.tensor([-10.0])}, {})
    cfg = train_config(tmp_path, init_from=str(tiny_init))
    with pytest.raises(InitWeightsError, match="train.loss=siglip"):
        load_init_from(build_model(cfg.model), cfg, cfg.train.init_from)


def test_init_from_errors_name_the_key(tmp_path, tiny_init):
    cfg = train_config(tmp_path, init_from=str(tiny_init))
    wrong_arch = validate({**cfg.model_dump(mode="json"), "model": {"arch": "tiny-32"}})
    with pytest.raises(InitWeightsError, match=r"train.init_from=.* holds tiny-28 weights but model.arch is 'tiny-32'"):
        load_init_from(build_model(wrong_arch.model), wrong_arch, wrong_arch.train.init_from)
    missing = train_config(tmp_path, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(InitWeightsError, match="train.init_from=.*neither a megapgs initial checkpoint"):
        load_init_from(build_model(missing.model), missing, missing.train.init_from)
    state, _ = load_init_weights(tiny_init)
    write_init_checkpoint(tiny_init, "tiny-28", {k: v for k, v in state.items() if k != "text.ln_final.weight"}, {})
    with pytest.raises(InitWeightsError, match=r"missing \['text.ln_final.weight'\]"):
        load_init_from(build_model(cfg.model), cfg, cfg.train.init_from)


# ----------------------------------------------------------------------------- other archs (issue 16)

def test_custom_towers_convert_under_the_config_files_name(tmp_path):
    """An OpenCLIP directory whose towers no named arch has converts as a custom arch, recorded in the
    initial checkpoint (model_cfg), so nothing but the checkpoint is needed to load it."""
    import open_clip

    cfg = {**TINY_CFG, "embed_dim": 80}
    torch.manual_seed(3)
    folder = write_openclip_dir(tmp_path / "openclip", open_clip.model.CLIP(**cfg).eval(), cfg)
    source = load_openclip_state(str(folder))
    assert source.spec.name == str(folder / "open_clip_config.json") and source.spec.embed_dim == 80
    write_init_checkpoint(tmp_path / "init", source.spec, megapgs_state(source), source.describe())
    (folder / "open_clip_config.json").unlink()  # the initial checkpoint stands alone
    state, spec = load_init_weights(tmp_path / "init")
    assert spec.numbers() == source.spec.numbers() and spec.openclip_name is None
    assert_same_state(to_openclip(state, source.state), source.state)


def with_arch(cfg, arch):
    return validate({**cfg.model_dump(mode="json"), "model": {"arch": arch}})


def json_arch(tmp_path, name, **vision):
    cfg = openclip_model_cfg(get_arch("tiny-28"))
    path = tmp_path / name
    path.write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], **vision}}))
    return str(path)


def test_init_from_at_another_image_size_interpolates_the_positional_embeddings(tmp_path, tiny_init, caplog):
    from open_clip.model import resize_pos_embed

    arch56 = json_arch(tmp_path, "tiny56.json", image_size=56)
    cfg = with_arch(train_config(tmp_path, init_from=str(tiny_init)), arch56)
    model = build_model(cfg.model)
    with caplog.at_level("INFO"):
        load_init_from(model, cfg, cfg.train.init_from)
    assert "interpolated from 7x7 (28 px) to 14x14 (56 px)" in caplog.text
    state, _ = load_init_weights(tiny_init)
    openclip_way = {"visual.positional_embedding": state["visual.positional_embedding"].clone()}
    resize_pos_embed(openclip_way, type("M", (), {"visual": type("V", (), {"grid_size": (14, 14)})()})())
    loaded = model.state_dict()
    assert torch.equal(loaded["visual.positional_embedding"], openclip_way["visual.positional_embedding"])
    for key, value in state.items():
        if key != "visual.positional_embedding":
            assert torch.equal(loaded[key], value), key
    with torch.no_grad():  # the model runs at 56 px
        assert model.encode_image(torch.randn(2, 3, 56, 56)).shape == (2, 64)


def test_init_from_of_another_patch_size_is_refused(tmp_path, tiny_init):
    arch = json_arch(tmp_path, "tiny56p8.json", image_size=56, patch_size=8)
    cfg = with_arch(train_config(tmp_path, init_from=str(tiny_init)), arch)
    with pytest.raises(InitWeightsError, match=r"holds tiny-28 weights but model.arch is .*tiny56p8.json'.*"
                                               r"differ in vision.patch_size 4 vs 8 \(only the image size may differ"):
        load_init_from(build_model(cfg.model), cfg, cfg.train.init_from)
