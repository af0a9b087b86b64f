"""Our CLIP against transformers' CLIPModel, and every checkpoint format the loader reads.

Random tiny transformers.CLIPModel instances of two shapes (every parameter perturbed, so a swapped or
mis-transposed tensor shows) are saved with save_pretrained; our model loaded from the folder must give
the same image embeddings, text embeddings and logits (relative error <= 1e-5, fp32) on real photos and
captions. The same weights in OpenAI / open_clip names (.safetensors, .bin, wrapped .pt, TorchScript)
must load to the same outputs; broken files must fail with errors naming the file and the key.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from promptkd.cli import main as cli_main  # noqa: E402
from promptkd.models.clip import CLIP  # noqa: E402
from promptkd.models.tokenizer import default_tokenizer  # noqa: E402
from promptkd.models.weights import UntrustedCheckpointError, load_clip, read_clip_checkpoint, save_clip  # noqa: E402

REL_TOL = 1e-5
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CAPTIONS = ("a photo of an astronaut", "a cup of coffee on a saucer", "a ginger cat",
            "a rocket on the launch pad at night", "a photo of a dog.")

# A follows OpenAI's head rule (heads = width // 64); B does not and uses GELU. Neither has a known
# architecture's widths, so a plain state dict of either needs its architecture said (arch=, below).
SHAPES = {
    "A": dict(vision=dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                          image_size=32, patch_size=8, hidden_act="quick_gelu"),
              text=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=2,
                        hidden_act="quick_gelu"),
              projection_dim=48),
    "B": dict(vision=dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=3,
                          image_size=48, patch_size=16, hidden_act="gelu"),
              text=dict(hidden_size=96, intermediate_size=256, num_attention_heads=3, num_hidden_layers=3,
                        hidden_act="gelu"),
              projection_dim=40),
}


def open_clip_model_cfg(shape: str) -> dict:
    """The shape in open_clip's model-config terms (what its model_configs/*.json hold)."""
    v, t = SHAPES[shape]["vision"], SHAPES[shape]["text"]
    return {"embed_dim": SHAPES[shape]["projection_dim"], "quick_gelu": v["hidden_act"] == "quick_gelu",
            "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                           "head_width": v["hidden_size"] // v["num_attention_heads"], "patch_size": v["patch_size"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": t["hidden_size"],
                         "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"]}}


def make_hf_model(shape: str, seed: int = 0):
    spec = SHAPES[shape]
    text = dict(spec["text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # perturb everything: LayerNorms away from 1/0, biases away from 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(float(np.log(30.0)))
    return model


def photos(size: int) -> torch.Tensor:
    try:
        from promptkd.data.transforms import Preprocess

        prep = Preprocess(size)
    except ImportError:  # simple resize + CLIP normalisation
        mean, std = torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])

        def prep(img):
            x = torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC))).float() / 255
            return ((x - mean) / std).permute(2, 0, 1)

    return torch.stack([prep(Image.fromarray(getattr(skdata, name)())) for name in PHOTOS])


def captions() -> torch.Tensor:
    return default_tokenizer()(list(CAPTIONS), context_length=77)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def hf_reference(model, images, tokens) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
        out = model(input_ids=tokens, pixel_values=images)
    pooled = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output  # noqa: E731 (transformers 4 vs 5)
    return {"image": pooled(img), "text": pooled(txt), "logits": out.logits_per_image}


def ours(model: CLIP, images, tokens) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.encode_image(images), "text": model.encode_text(tokens), "logits": model(images, tokens)[0]}


def assert_same(got: dict, ref: dict, what: str) -> None:
    for key in ("image", "text", "logits"):
        assert got[key].shape == ref[key].shape, (what, key)
        err = rel_err(got[key], ref[key])
        assert err <= REL_TOL, f"{what}: {key} relative error {err:.2e} > {REL_TOL}"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_case(request, tmp_path_factory):
    shape = request.param
    model = make_hf_model(shape)
    folder = tmp_path_factory.mktemp(f"hf_{shape}")
    model.save_pretrained(folder)
    size = SHAPES[shape]["vision"]["image_size"]
    images, tokens = photos(size), captions()
    return {"shape": shape, "folder": folder, "model": model, "ref": hf_reference(model, images, tokens),
            "images": images, "tokens": tokens}


def test_hf_folder_matches_transformers(hf_case):
    loaded = load_clip(hf_case["folder"], with_info=True)
    assert loaded.format == "hf"
    spec = SHAPES[hf_case["shape"]]
    cfg = loaded.model.cfg
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size, cfg.vision.image_size) == (
        spec["vision"]["hidden_size"], spec["vision"]["num_hidden_layers"], spec["vision"]["num_attention_heads"],
        spec["vision"]["patch_size"], spec["vision"]["image_size"])
    assert cfg.act == spec["vision"]["hidden_act"] and cfg.embed_dim == spec["projection_dim"]
    assert_same(ours(loaded.model, hf_case["images"], hf_case["tokens"]), hf_case["ref"], f"HF folder {hf_case['shape']}")
    # the embeddings are not trivially equal across captions/photos (the comparison means something)
    assert hf_case["ref"]["logits"].std() > 1e-3


def test_hf_pytorch_model_bin_folder(hf_case, tmp_path):
    # the older transformers layout (transformers 5 always writes safetensors, so write it by hand)
    shutil.copy(hf_case["folder"] / "config.json", tmp_path / "config.json")
    torch.save(hf_case["model"].state_dict(), tmp_path / "pytorch_model.bin")
    assert_same(ours(load_clip(tmp_path), hf_case["images"], hf_case["tokens"]), hf_case["ref"], "pytorch_model.bin")


def test_our_safetensors_keeps_heads_and_activation(hf_case, tmp_path):
    model = load_clip(hf_case["folder"])
    path = save_clip(model, tmp_path / "clip.safetensors")
    again = load_clip(path)
    assert again.cfg == model.cfg
    assert_same(ours(again, hf_case["images"], hf_case["tokens"]), hf_case["ref"], "our safetensors")
    # `promptkd convert` on the HF folder writes the same kind of file
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(hf_case["folder"]), str(out)]) == 0
    converted = load_clip(out)
    assert converted.cfg == model.cfg
    assert_same(ours(converted, hf_case["images"], hf_case["tokens"]), hf_case["ref"], "converted HF folder")


@pytest.fixture(scope="module")
def openai_case(tmp_path_factory):
    """Shape A's weights in OpenAI names, and the HF reference outputs."""
    model = make_hf_model("A", seed=1)
    folder = tmp_path_factory.mktemp("hf_openai")
    model.save_pretrained(folder)
    images, tokens = photos(32), captions()
    ours_model = load_clip(folder)
    state = {k: v.clone() for k, v in ours_model.state_dict().items()}
    return {"state": state, "ref": hf_reference(model, images, tokens), "images": images, "tokens": tokens,
            "model": ours_model}


def test_openai_named_safetensors_and_bin(openai_case, tmp_path):
    state = openai_case["state"]
    save_file(state, str(tmp_path / "plain.safetensors"))
    torch.save(state, tmp_path / "plain.bin")
    # open_clip training checkpoint: wrapped, DDP prefixes, extra non-tensor entries
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_3.pt")
    for name in ("plain.safetensors", "plain.bin", "epoch_3.pt"):
        # no known architecture has these widths, so the heads must be said
        with pytest.raises(ValueError, match="cannot tell how many attention heads.*--arch"):
            load_clip(tmp_path / name)
        model = load_clip(tmp_path / name, arch=open_clip_model_cfg("A"))
        assert_same(ours(model, openai_case["images"], openai_case["tokens"]), openai_case["ref"], name)


def test_torchscript_needs_opt_in(openai_case, tmp_path):
    model = openai_case["model"]
    # like OpenAI's archives: a scripted module whose state dict carries OpenAI names (+ 3 int entries)
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        model.register_buffer(key, torch.tensor(value))
    traced = torch.jit.trace(model, (openai_case["images"], openai_case["tokens"]), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    for key in ("input_resolution", "context_length", "vocab_size"):
        delattr(model, key)

    with pytest.raises(UntrustedCheckpointError, match="trust_checkpoint=True.*--trust-checkpoint"):
        load_clip(path)
    assert read_clip_checkpoint(path, trust_checkpoint=True).format == "torchscript"
    trusted = load_clip(path, trust_checkpoint=True)
    assert_same(ours(trusted, openai_case["images"], openai_case["tokens"]), openai_case["ref"], "TorchScript")

    # the CLI: refused without the flag, converted with it; the output loads without any opt-in
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(path), str(out)]) == 2 and not out.exists()
    assert cli_main(["convert", str(path), str(out), "--trust-checkpoint"]) == 0
    assert_same(ours(load_clip(out), openai_case["images"], openai_case["tokens"]), openai_case["ref"], "converted")


class _NotATensor:
    pass


def test_pickles_beyond_tensors_are_refused(openai_case, tmp_path):
    path = tmp_path / "with_object.pt"
    torch.save({"state_dict": openai_case["state"], "extra": _NotATensor()}, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"):
        load_clip(path)
    load_clip(path, trust_checkpoint=True, arch=open_clip_model_cfg("A"))  # the user's explicit opt-in
    # a HF pytorch_model.bin is never fully unpickled, even when trusted
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"x": _NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_clip(folder, trust_checkpoint=True)
    assert pickle  # (kept for readers: these files are pickles)


def test_broken_state_dicts_name_file_and_key(openai_case, tmp_path):
    state = openai_case["state"]
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "visual.ln_post.bias"}, "missing keys.*visual.ln_post.bias"),
        "unknown": ({**state, "visual.extra_token": torch.zeros(3)}, "unknown keys.*visual.extra_token"),
        "shape": ({**state, "ln_final.bias": torch.zeros(7)}, "shape mismatch for ln_final.bias"),
        "layer": ({k: v for k, v in state.items() if ".resblocks.0." not in k or k.startswith("visual.")},
                  "transformer.resblocks.N: layers \\[0\\] are missing"),
    }
    for name, (broken, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        with pytest.raises(ValueError, match=pattern) as info:
            load_clip(path, arch=open_clip_model_cfg("A"))
        assert str(path) in str(info.value), name


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, not weights")
    with pytest.raises(ValueError, match="notes.pt"):
        load_clip(bad)
    with pytest.raises(FileNotFoundError):
        load_clip(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(tmp_path)


def test_other_models_are_named(tmp_path):
    dassl = {"prompt_learner.ctx": torch.zeros(4, 8), "image_encoder.conv1.weight": torch.zeros(8, 3, 4, 4)}
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1), "visual.attnpool.c_proj.weight": torch.zeros(4, 4)}
    for name, state, pattern in (("dassl", dassl, "convert-teacher"), ("rn50", resnet, "ResNet")):
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError, match=pattern):
            load_clip(path)
