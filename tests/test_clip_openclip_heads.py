"""open_clip checkpoints load with the right attention heads, activation and normalisation (issue 9.1).

Random transformers ``CLIPModel`` instances whose heads are NOT width // 64 (vision head width 80 as in
ViT-H-14, 96; text heads 4 of a 128 width, 3 of a 96 width) are saved the way open_clip publishes a
model: its state-dict names (renamed here, by this test's own code) in ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin`` with ``open_clip_config.json`` beside. Every entry point (load_clip on the
folder and on the file, ``promptkd convert`` then the converted file alone, ``train-teacher``, ``distill``,
an artefact rebuilt from its identity) must give transformers' image and text features (relative error
<= 1e-5). Without a config or ``arch`` such a file is refused, never loaded with guessed heads.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from promptkd.cli import main  # noqa: E402
from promptkd.models.clip import CLIP  # noqa: E402
from promptkd.models.tokenizer import default_tokenizer  # noqa: E402
from promptkd.models.weights import load_clip  # noqa: E402

REL_TOL = 1e-5
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CAPTIONS = ("a photo of an astronaut", "a cup of coffee", "a ginger cat", "a rocket at night")

# (transformers vision kwargs, text kwargs, projection, open_clip weights file, preprocess mean/std)
MODELS = {
    # ViT-H-14's head width (80) on a tiny tower: width 320 = 4 heads of 80 (width // 64 would say 5);
    # text 128 wide with 4 heads (width // 64 would say 2); LAION-style GELU
    "hw80": dict(vision=dict(hidden_size=320, num_attention_heads=4, intermediate_size=1280, num_hidden_layers=2,
                             image_size=32, patch_size=8, hidden_act="gelu"),
                 text=dict(hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2,
                           hidden_act="gelu"),
                 projection_dim=48, file="open_clip_model.safetensors", mean=OPENAI_MEAN, std=OPENAI_STD),
    # head width 96 (width // 64 would say 3 heads, not 2); text 3 heads of 32 (not 1); QuickGELU;
    # Inception normalisation, as some open_clip models have
    "hw96": dict(vision=dict(hidden_size=192, num_attention_heads=2, intermediate_size=768, num_hidden_layers=2,
                             image_size=32, patch_size=16, hidden_act="quick_gelu"),
                 text=dict(hidden_size=96, num_attention_heads=3, intermediate_size=384, num_hidden_layers=2,
                           hidden_act="quick_gelu"),
                 projection_dim=40, file="open_clip_pytorch_model.bin", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
}


def hf_model(name: str, seed: int = 0):
    spec = MODELS[name]
    text = dict(spec["text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # every tensor perturbed: a swapped or mis-split tensor must show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(float(np.log(30.0)))
    return model


def open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under open_clip's CLIP names (this test's own renaming, from open_clip's layout)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {"visual.class_embedding": sd.pop("vision_model.embeddings.class_embedding"),
           "visual.conv1.weight": sd.pop("vision_model.embeddings.patch_embedding.weight"),
           "visual.positional_embedding": sd.pop("vision_model.embeddings.position_embedding.weight"),
           "visual.proj": sd.pop("visual_projection.weight").t().contiguous(),
           "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           "text_projection": sd.pop("text_projection.weight").t().contiguous(),
           "logit_scale": sd.pop("logit_scale")}
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = sd.pop(f"vision_model.pre_layrnorm.{part}")
        out[f"visual.ln_post.{part}"] = sd.pop(f"vision_model.post_layernorm.{part}")
        out[f"ln_final.{part}"] = sd.pop(f"text_model.final_layer_norm.{part}")
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for key in [k for k in sd if ".encoder.layers." in k]:
        tower, i, rest = re.match(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)", key).groups()
        block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{i}"
        if m := re.fullmatch(r"self_attn\.q_proj\.(weight|bias)", rest):
            qkv = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{block}.attn.in_proj_{m[1]}"] = torch.cat(qkv)
        elif not re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", rest):
            module, param = rest.rsplit(".", 1)
            out[f"{block}.{renames[module]}.{param}"] = sd[key]
    return out


def open_clip_config(name: str, head_width: int | None = None) -> dict:
    """``open_clip_config.json`` as open_clip's push_to_hf_hub writes it: model_cfg + preprocess_cfg."""
    spec = MODELS[name]
    v, t = spec["vision"], spec["text"]
    return {"model_cfg": {"embed_dim": spec["projection_dim"], "quick_gelu": v["hidden_act"] == "quick_gelu",
                          "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"],
                                         "width": v["hidden_size"],
                                         "head_width": head_width or v["hidden_size"] // v["num_attention_heads"],
                                         "patch_size": v["patch_size"],
                                         "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
                          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": t["hidden_size"],
                                       "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"]}},
            "preprocess_cfg": {"mean": spec["mean"], "std": spec["std"]}}


def write_open_clip_folder(folder, name: str, model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = open_clip_state_dict(model)
    if MODELS[name]["file"].endswith(".safetensors"):
        save_file(state, str(folder / MODELS[name]["file"]))
    else:
        torch.save(state, folder / MODELS[name]["file"])
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(name), indent=2))


def hf_features(model, images, tokens) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
    pooled = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output  # noqa: E731 (transformers 4 vs 5)
    return {"image": pooled(img), "text": pooled(txt)}


def our_features(clip: CLIP, images, tokens) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {"image": clip.encode_image(images)}
        if clip.has_text:
            out["text"] = clip.encode_text(tokens)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def assert_matches(got: dict, ref: dict, what: str) -> None:
    for key, value in got.items():
        err = rel_err(value, ref[key])
        assert err <= REL_TOL, f"{what}: {key} features relative error {err:.2e} > {REL_TOL}"


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    name = request.param
    model = hf_model(name)
    folder = tmp_path_factory.mktemp(f"open_clip_{name}") / "model"
    write_open_clip_folder(folder, name, model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = default_tokenizer()(list(CAPTIONS), context_length=77)
    return {"name": name, "model": model, "folder": folder, "file": folder / MODELS[name]["file"],
            "images": images, "tokens": tokens, "ref": hf_features(model, images, tokens)}


def expected_heads(name: str) -> tuple[int, int]:
    return MODELS[name]["vision"]["num_attention_heads"], MODELS[name]["text"]["num_attention_heads"]


def test_folder_and_file_load_with_the_configs_heads_activation_and_normalisation(case):
    spec = MODELS[case["name"]]
    for src in (case["folder"], case["file"]):
        loaded = load_clip(src, with_info=True)
        cfg = loaded.model.cfg
        assert (cfg.vision.heads, cfg.text.heads) == expected_heads(case["name"]), src
        assert cfg.act == spec["vision"]["hidden_act"] and loaded.arch_source.endswith("open_clip_config.json")
        assert list(cfg.mean) == spec["mean"] and list(cfg.std) == spec["std"]
        assert_matches(our_features(loaded.model, case["images"], case["tokens"]), case["ref"], str(src))
    assert case["ref"]["image"].std() > 1e-3 and case["ref"]["text"].std() > 1e-3  # not trivially equal


def test_width_over_64_heads_would_have_given_other_features(case):
    """The rule promptkd used before for such files (heads = width // 64) fails this parity."""
    cfg = load_clip(case["folder"]).cfg
    v, t = cfg.vision, cfg.text
    assert (v.width // 64, t.width // 64) != (v.heads, t.heads)
    wrong = CLIP(replace(cfg, vision=replace(v, heads=v.width // 64), text=replace(t, heads=t.width // 64)))
    wrong.load_state_dict(load_clip(case["folder"]).state_dict())
    got = our_features(wrong.eval(), case["images"], case["tokens"])
    assert rel_err(got["image"], case["ref"]["image"]) > 1e-3 and rel_err(got["text"], case["ref"]["text"]) > 1e-3


def test_convert_records_the_architecture_and_the_output_loads_alone(case, tmp_path, capsys):
    out = tmp_path / "alone" / "converted.safetensors"
    assert main(["convert", str(case["folder"]), str(out)]) == 0
    assert "open_clip_config.json" in capsys.readouterr().err  # says where the architecture came from
    assert not (out.parent / "open_clip_config.json").exists()
    converted = load_clip(out)
    assert (converted.cfg.vision.heads, converted.cfg.text.heads) == expected_heads(case["name"])
    assert list(converted.cfg.mean) == MODELS[case["name"]]["mean"]
    assert_matches(our_features(converted, case["images"], case["tokens"]), case["ref"], "converted file alone")


def test_bare_weights_are_refused_until_the_architecture_is_said(case, tmp_path, capsys):
    bare = tmp_path / ("bare" + case["file"].suffix)
    shutil.copy(case["file"], bare)  # the weights without their open_clip_config.json
    with pytest.raises(ValueError, match=r"cannot tell how many attention heads the vision tower.*--arch") as info:
        load_clip(bare)
    assert str(bare) in str(info.value)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(bare), str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--arch" in err and "open_clip_config.json" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    # --arch with the open_clip model config (a file), or arch= with it as a dict: loads right
    cfg_file = tmp_path / "model_cfg.json"
    cfg_file.write_text(json.dumps(open_clip_config(case["name"])["model_cfg"]))
    assert main(["convert", str(bare), str(out), "--arch", str(cfg_file)]) == 0
    assert_matches(our_features(load_clip(out), case["images"], case["tokens"]), case["ref"], "--arch FILE")
    by_dict = load_clip(bare, arch=open_clip_config(case["name"]))
    assert_matches(our_features(by_dict, case["images"], case["tokens"]), case["ref"], "arch=dict")

    # a known architecture's name that does not fit the tensors is refused, naming the difference
    assert main(["convert", str(bare), str(out), "--arch", "ViT-H-14"]) == 2
    assert "arch ViT-H-14 does not describe this checkpoint: embed_dim 1024" in capsys.readouterr().err
    # two descriptions that disagree on the heads: refused, not one silently preferred
    beside = tmp_path / "open_clip_config.json"
    beside.write_text(json.dumps(open_clip_config(case["name"], head_width=32)))
    with pytest.raises(ValueError, match="disagree on the attention heads"):
        load_clip(bare, arch=open_clip_config(case["name"]))


def test_the_resolved_architecture_is_recorded_and_rebuilds_without_arch(case, tmp_path):
    from promptkd import artifacts
    from promptkd.models.clip_backbones import load_clip_student, load_clip_teacher
    from promptkd.models.prompts import PromptConfig

    bare = tmp_path / "weights" / ("bare" + case["file"].suffix)
    bare.parent.mkdir()
    shutil.copy(case["file"], bare)
    arch = tmp_path / "model_cfg.json"
    arch.write_text(json.dumps(open_clip_config(case["name"])))
    teacher = load_clip_teacher(bare, PromptConfig(text_depth=1, vision_depth=1), arch=str(arch))
    student = load_clip_student(bare, teacher_dim=teacher.embed_dim, prompts=PromptConfig(vision_depth=1),
                                arch=str(arch))
    assert teacher.image_spec.mean == tuple(MODELS[case["name"]]["mean"]) == student.image_spec.mean
    ident = teacher.identity()["arch"]
    assert (ident["vision"]["heads"], ident["text"]["heads"]) == expected_heads(case["name"])
    artifacts.save_adapter(teacher, tmp_path / "teacher", "teacher")
    artifacts.save_adapter(student, tmp_path / "student", "student")
    arch.unlink()  # nothing but the artefact says the architecture now
    rebuilt, _ = artifacts.load_adapter(tmp_path / "teacher", role="teacher")
    assert rebuilt.image_spec == teacher.image_spec
    assert_matches(our_features(rebuilt.clip, case["images"], case["tokens"]), case["ref"], "rebuilt teacher")
    rebuilt_student, _ = artifacts.load_adapter(tmp_path / "student", role="student")
    assert_matches(our_features(rebuilt_student.clip, case["images"], case["tokens"]), case["ref"], "rebuilt student")


# --- known architectures: heads from shapes, names --------------------------------------------------

# open_clip model_configs facts, written out here: (vision width, layers, mlp width, patch, image; text width,
# layers; embed) -> (vision heads, text heads)
KNOWN_SHAPES = {
    "ViT-B-16": ((768, 12, 3072, 16, 224, 512, 12, 512), (12, 8)),
    "ViT-L-14": ((1024, 24, 4096, 14, 224, 768, 12, 768), (16, 12)),
    "ViT-H-14": ((1280, 32, 5120, 14, 224, 1024, 24, 1024), (16, 16)),  # head width 80
    "ViT-g-14": ((1408, 40, 6144, 14, 224, 1024, 24, 1024), (16, 16)),  # head width 88
    "ViT-bigG-14": ((1664, 48, 8192, 14, 224, 1280, 32, 1280), (16, 20)),  # head width 104
}


def shape_only_state(v_width, v_layers, v_mlp, patch, image, t_width, t_layers, embed) -> dict[str, torch.Tensor]:
    """Zero-stride tensors with a real checkpoint's shapes (the shapes are all the inference reads)."""
    z = lambda *shape: torch.zeros(()).expand(*shape)  # noqa: E731
    grid = image // patch
    state = {"visual.conv1.weight": z(v_width, 3, patch, patch), "visual.proj": z(v_width, embed),
             "visual.positional_embedding": z(grid * grid + 1, v_width), "token_embedding.weight": z(49408, t_width),
             "positional_embedding": z(77, t_width), "ln_final.weight": z(t_width)}
    for i in range(v_layers):
        state[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = z(v_mlp, v_width)
    for i in range(t_layers):
        state[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = z(4 * t_width, t_width)
    return state


def test_known_architectures_settle_the_heads_from_their_shapes():
    from promptkd.models.weights import _tensor_shapes, resolve_config

    for name, (shape, heads) in KNOWN_SHAPES.items():
        shapes = _tensor_shapes(shape_only_state(*shape), name)
        cfg, settled, notes = resolve_config(shapes, [], name)
        assert (cfg.vision.heads, cfg.text.heads) == heads, name
        assert settled == "the shape of a known architecture"
        assert cfg.act == "quick_gelu" and any("QuickGELU assumed" in n for n in notes)  # said, not silent
        cfg, _, notes = resolve_config(shapes, [], name, act="gelu")
        assert cfg.act == "gelu" and not notes
    # a ViT-H width with another depth is not ViT-H: refused, not given ViT-H's heads
    odd = _tensor_shapes(shape_only_state(1280, 2, 5120, 14, 224, 1024, 24, 1024), "odd")
    with pytest.raises(ValueError, match="vision tower .*width 1280, 2 layers"):
        resolve_config(odd, [], "odd")
    # OpenAI's TorchScript files keep OpenAI's rule
    cfg, settled, _ = resolve_config(odd, [], "odd", openai_rule=True)
    assert (cfg.vision.heads, cfg.text.heads) == (20, 16) and "OpenAI" in settled


def test_architecture_names_follow_open_clip_and_openai():
    from promptkd.models.clip_archs import named_arch

    h = named_arch("ViT-H-14").config
    assert (h.vision.heads, h.vision.width // h.vision.heads, h.text.heads, h.act) == (16, 80, 16, "gelu")
    g = named_arch("ViT-g-14").config
    assert (g.vision.heads, g.vision.width // g.vision.heads, g.vision.mlp_width) == (16, 88, 6144)
    big = named_arch("ViT-bigG-14-quickgelu").config
    assert (big.vision.width // big.vision.heads, big.text.heads, big.act) == (104, 20, "quick_gelu")
    b16 = named_arch("ViT-B/16").config  # OpenAI's name: OpenAI's QuickGELU
    assert (b16.vision.heads, b16.text.heads, b16.act, b16.vision.patch_size) == (12, 8, "quick_gelu", 16)
    assert named_arch("ViT-B-16").config.act == "gelu"  # open_clip's ViT-B-16 config: GELU
    l336 = named_arch("ViT-L/14@336px").config
    assert (l336.vision.image_size, l336.vision.heads, l336.text.heads, l336.embed_dim) == (336, 16, 12, 768)
    with pytest.raises(ValueError, match="did you mean 'ViT-H-14'"):
        named_arch("vit-h-14")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_train_teacher_and_distill_load_an_open_clip_model(tmp_path_factory):
    """train-teacher on the folder, distill on the weights file inside it: the artefacts' frozen CLIPs
    give transformers' features, with the config's heads recorded in adapter.json."""
    from promptkd.data.fixtures import make_fixture
    from promptkd.methods.teacher_io import load_teacher
    from promptkd.serve import load_student

    name = "hw80"
    root = tmp_path_factory.mktemp("cli_open_clip")
    model = hf_model(name)
    write_open_clip_folder(root / "ViT-tiny-hw80", name, model)
    make_fixture(root / "data", "Caltech101", classes=4, per_class=4, test_per_class=2)
    fast = ["--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "train.precision=fp32",
            "--set", "train.num_workers=0", "--set", "train.device=cpu"]
    data = str(root / "data")
    assert main(["train-teacher", "--data-root", data, "--dataset", "Caltech101", "--clip-weights",
                 str(root / "ViT-tiny-hw80"), "--out", str(root / "teacher"), "--seed", "1", *fast,
                 "--set", "data.shots=2", "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1",
                 "--set", "method.templates=single", "--set", "method.gpa_mean=1"]) == 0
    assert main(["class-vectors", "--teacher", str(root / "teacher"), "--dataset", "Caltech101", "--data-root", data,
                 "--out", str(root / "cv.safetensors"), "--device", "cpu"]) == 0
    assert main(["distill", "--config", "distill/base2novel/caltech101", "--data-root", data,
                 "--teacher", str(root / "teacher"), "--class-vectors", str(root / "cv.safetensors"),
                 "--student-weights", str(root / "ViT-tiny-hw80" / MODELS[name]["file"]),
                 "--out", str(root / "student"), "--seed", "1", *fast, "--set", "student.depth=1"]) == 0

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = default_tokenizer()(list(CAPTIONS), context_length=77)
    ref = hf_features(model, images, tokens)
    teacher, meta = load_teacher(root / "teacher")
    assert (meta["backbone"]["arch"]["vision"]["heads"], meta["backbone"]["arch"]["text"]["heads"]) == (4, 4)
    assert_matches(our_features(teacher.clip, images, tokens), ref, "train-teacher's CLIP")
    student = load_student(root / "student").student
    assert student.clip.cfg.vision.heads == 4
    assert_matches(our_features(student.clip, images, tokens), ref, "distill's student CLIP")

    # the same weights without their config: train-teacher refuses with what to pass
    bare = root / "bare.safetensors"
    shutil.copy(root / "ViT-tiny-hw80" / MODELS[name]["file"], bare)
    assert main(["train-teacher", "--data-root", data, "--dataset", "Caltech101", "--clip-weights", str(bare),
                 "--out", str(root / "teacher_bare"), *fast]) == 2
    # ... and --arch (train-teacher, evaluate) / --student-arch (distill) make the bare file load right
    arch = root / "hw80_config.json"
    arch.write_text(json.dumps(open_clip_config(name)))
    assert main(["train-teacher", "--data-root", data, "--dataset", "Caltech101", "--clip-weights", str(bare),
                 "--arch", str(arch), "--out", str(root / "teacher_bare"), "--seed", "1", *fast,
                 "--set", "data.shots=2", "--set", "teacher.text_depth=1", "--set", "teacher.vision_depth=1",
                 "--set", "method.templates=single", "--set", "method.gpa_mean=1"]) == 0
    assert_matches(our_features(load_teacher(root / "teacher_bare")[0].clip, images, tokens), ref, "--arch teacher")
    assert main(["distill", "--config", "distill/base2novel/caltech101", "--data-root", data,
                 "--teacher", str(root / "teacher"), "--class-vectors", str(root / "cv.safetensors"),
                 "--student-weights", str(bare), "--student-arch", str(arch), "--out", str(root / "student_bare"),
                 "--seed", "1", *fast, "--set", "student.depth=1"]) == 0
    assert_matches(our_features(load_student(root / "student_bare").student.clip, images, tokens), ref,
                   "--student-arch student")
    assert main(["evaluate", "--model", "zeroshot", "--clip-weights", str(bare), "--arch", str(arch), "--data-root",
                 data, "--dataset", "Caltech101", "--protocol", "base2novel", "--out", str(root / "eval_bare"),
                 "--device", "cpu", "--workers", "0"]) == 0
