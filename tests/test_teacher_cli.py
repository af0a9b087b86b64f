"""`promptkd train-teacher`, `class-vectors` and `convert-teacher` on a tiny fixture and tiny CLIP files."""

import json

import pytest
import torch
import torch.nn.functional as F

from promptkd import config as cfgmod
from promptkd.cli import main
from promptkd.methods import teacher_io
from promptkd.store import ClassListMismatch, ClassVectorStore

FAST = ["--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.precision=fp32",
        "--set", "train.num_workers=0", "--set", "train.device=cpu", "--set", "data.shots=2",
        "--set", "teacher.text_depth=2", "--set", "teacher.vision_depth=2", "--set", "method.gpa_mean=2",
        "--set", "method.templates=imagenet_select"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.fixtures import make_fixture
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    root = tmp_path_factory.mktemp("teacher_cli")
    make_fixture(root / "data", "Caltech101", classes=4, per_class=2, test_per_class=1)
    save_clip(tiny_clip(seed=1, width=32, layers=2, image_size=32, patch_size=8), root / "clip.safetensors")
    return root


def _cli(argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.filterwarnings("ignore:.*fewer than .* images:UserWarning")
def test_train_teacher_interrupted_then_resumed_then_class_vectors(world, capsys):
    out = world / "runs" / "teacher"
    base = ["train-teacher", "--data-root", world / "data", "--dataset", "Caltech101",
            "--clip-weights", world / "clip.safetensors", "--out", out]
    assert _cli([*base, "--seed", "2", *FAST, "--set", "train.max_steps=3"]) == 0
    assert not (out / "adapter.json").exists() and (out / "checkpoints" / "last.pt").is_file()
    assert _cli([*base, "--seed", "2", *FAST]) == 2  # an earlier run is never overwritten silently
    assert "pass --resume" in capsys.readouterr().err
    for changes_what_was_learnt in ("data.shots=3", "teacher.n_ctx_text=2", "train.batch_size=4"):
        assert _cli([*base, "--resume", "--set", changes_what_was_learnt]) == 2
        assert changes_what_was_learnt.split("=")[0] in capsys.readouterr().err
    # the schedule may change on resume (a lower lr after a NaN stop) and is recorded in the log
    assert _cli([*base, "--resume", "--set", "train.lr=0.004"]) == 0  # the saved config is reused, the stop point is not
    saved = cfgmod.load_yaml(out / "config.yaml")
    assert saved["train"]["seed"] == 2 and saved["data"]["classes"] == "base" and saved["train"]["max_steps"] is None
    assert saved["train"]["lr"] == 0.004
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["changes"] for r in records if r["type"] == "resume_changes"] == [["train.lr: 0.005 -> 0.004"]]
    teacher, meta = teacher_io.load_teacher(out)
    assert meta["class_names"] == ["face", "leopard"]  # the 2 base classes of the 4-class fixture
    assert meta["config"]["method"]["method"] == "promptsrc" and meta["selection"] == "gpa"

    vectors = world / "runs" / "class_vectors.safetensors"
    assert _cli(["class-vectors", "--teacher", out, "--dataset", "Caltech101", "--data-root", world / "data",
                 "--out", vectors, "--device", "cpu"]) == 0
    all_classes = ["face", "leopard", "motorbike", "accordion"]
    store = ClassVectorStore.load(vectors, expect_classes=all_classes)
    with torch.no_grad():
        expected = F.normalize(teacher.encode_class_names(all_classes).float(), dim=-1)
    assert torch.equal(store.vectors, expected) and store.teacher == teacher.identity()
    with pytest.raises(ClassListMismatch, match="class_vectors.safetensors.*4 classes but the dataset has 2"):
        ClassVectorStore.load(vectors, expect_classes=all_classes[:2])


def _save_dassl(path, clip_path, text, vision, foreign_object: bool):
    """A checkpoint in the authors' layout around the CLIP in ``clip_path``."""
    from safetensors.torch import load_file

    sd = {}
    for key, value in load_file(str(clip_path)).items():
        if key.startswith("visual."):
            sd["image_encoder." + key[len("visual."):]] = value
        elif key != "token_embedding.weight":
            sd[("text_encoder." + key) if key != "logit_scale" else key] = value
    sd["prompt_learner.ctx"] = text[0]
    sd["image_encoder.VPT"] = vision[0]
    sd["text_encoder.transformer.resblocks.1.VPT_shallow"] = text[1]
    sd["image_encoder.transformer.resblocks.1.VPT_shallow"] = vision[1]
    payload = {"state_dict": sd, "epoch": 20, "val_result": 90.0}
    if foreign_object:
        payload["scheduler"] = {"successor": torch.optim.lr_scheduler.LambdaLR}  # a pickled class reference
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def test_convert_teacher_needs_trust_and_reproduces_hand_set_prompts(world, capsys):
    torch.manual_seed(0)
    text = [torch.randn(4, 32) * 0.1 for _ in range(2)]
    vision = [torch.randn(4, 32) * 0.1 for _ in range(2)]
    src = world / "authors" / "OxfordPets" / "VLPromptLearner" / "model.pth.tar-20"
    _save_dassl(src, world / "clip.safetensors", text, vision, foreign_object=True)
    out = world / "converted"
    argv = ["convert-teacher", src, "--clip-weights", world / "clip.safetensors", "--out", out]
    assert _cli(argv) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not out.exists()
    assert _cli([*argv, "--trust-checkpoint"]) == 0
    said = capsys.readouterr().out
    assert f"from {src} (selection authors_model.pth.tar-20: the epoch that file holds)" in said
    converted, meta = teacher_io.load_teacher(out)
    assert meta["config"]["converted_from"]["epoch"] == 20 and meta["selection"] == "authors_model.pth.tar-20"

    by_hand = teacher_io.build_teacher(world / "clip.safetensors", {"text_depth": 2, "vision_depth": 2})
    with torch.no_grad():
        for i in range(2):
            by_hand.text_prompts.ctx[i] = text[i]
            by_hand.vision_prompts.ctx[i] = vision[i]
    by_hand.eval()
    images, names = torch.randn(3, 3, 32, 32), ["pug", "beagle", "persian"]
    with torch.no_grad():
        got = F.normalize(converted.encode_image(images), dim=-1) @ F.normalize(
            converted.encode_class_names(names), dim=-1).t()
        want = F.normalize(by_hand.encode_image(images), dim=-1) @ F.normalize(
            by_hand.encode_class_names(names), dim=-1).t()
    assert torch.equal(got, want)
    # reading the authors' file directly works too (converted on the fly)
    direct, _ = teacher_io.load_teacher(src, weights=world / "clip.safetensors", trust_checkpoint=True)
    assert torch.equal(direct.vision_prompts.ctx, converted.vision_prompts.ctx)


@pytest.mark.parametrize("preset,classes", [("teacher/base2novel", "base"), ("teacher/imagenet_all", "all")])
def test_presets_hold_the_papers_teacher_settings(preset, classes):
    from promptkd.methods.promptsrc import resolve_templates
    from promptkd.stages import teacher_settings

    def resolve_config(preset, overrides, seed):
        return teacher_settings(preset, [*overrides, f"train.seed={seed}"])

    cfg = resolve_config(preset, [], seed=3)
    assert cfg["data"] == {"classes": classes, "shots": 16, "on_bad_image": "skip", "max_image_pixels": 89_478_485}
    assert cfg["teacher"] == {"n_ctx_text": 4, "text_depth": 9, "ctx_init": "a photo of a", "n_ctx_vision": 4,
                              "vision_depth": 9}
    m, t = cfg["method"], cfg["train"]
    assert (m["method"], m["image_loss_weight"], m["text_loss_weight"], m["logits_loss_weight"]) == ("promptsrc", 10, 25, 1)
    assert (m["gpa_mean"], m["gpa_std"], len(resolve_templates(m["templates"]))) == (15, 1, 60)
    assert (t["epochs"], t["batch_size"], t["lr"], t["warmup_epochs"], t["warmup_lr"], t["seed"]) == (20, 8, 0.005, 1, 1e-5, 3)
    coop = resolve_config(preset, ["method.method=coop"], seed=1)
    assert (coop["teacher"]["text_depth"], coop["teacher"]["vision_depth"]) == (1, 0)
    with pytest.raises(ValueError, match="unknown key 'teacher.depth'"):
        resolve_config(preset, ["teacher.depth=3"], seed=1)
