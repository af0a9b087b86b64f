"""Text prompt templates: CoOp's single per-dataset template and PromptSRC's 60-template ensemble.

Every template holds exactly one ``{}`` where the class name goes (after CoOp's clean-up:
underscores become spaces, see :func:`promptkd.data.benchmarks.prompt_name`).

Sources (facts, written out here): CoOp's ``CUSTOM_TEMPLATES`` (github.com/KaiyangZhou/CoOp,
``trainers/zsclip.py``), the 60 templates of PromptSRC's ``trainers/imagenet_templates.py``
(github.com/muzairkhattak/PromptSRC), themselves a subset of the 80 ImageNet templates of OpenAI
CLIP's ``Prompt_Engineering_for_ImageNet`` notebook, in the same order, and CoOp's 7-template
``IMAGENET_TEMPLATES_SELECT`` (its ZeroshotCLIP2 ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TEMPLATE = "a photo of a {}."

# CoOp's zero-shot template per dataset, under our benchmark names (promptkd.data.benchmarks.REGISTRY).
# Note Food101's has no article: "a photo of {}, a type of food." (as in CoOp).
COOP_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# PromptSRC's frozen "textual diversity" ensemble (60 templates, PromptSRC's order).
PROMPTSRC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)

# CoOp's small ImageNet ensemble (ZeroshotCLIP2).
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS = ("single", "coop", "promptsrc", "ensemble", "imagenet_select")


def coop_template(dataset: str | None) -> str:
    """CoOp's template for a dataset name (aliases such as ``OxfordFlowers`` accepted);
    ``"a photo of a {}."`` for an empty or unknown (custom) dataset."""
    if not dataset:
        return DEFAULT_TEMPLATE
    from promptkd.data.benchmarks import get_spec

    try:
        name = get_spec(dataset).name
    except ValueError:
        return DEFAULT_TEMPLATE
    return COOP_TEMPLATES.get(name, DEFAULT_TEMPLATE)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; each must hold exactly one ``{}``."""
    if isinstance(templates, str):
        templates = [templates]
    out = [str(t) for t in templates]
    if not out:
        raise ValueError("the template list is empty")
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name: {bad[:3]}")
    return out


def template_set(name: str, dataset: str | None = None) -> list[str]:
    """A named template set.

    ``single``: ``"a photo of a {}."``; ``coop``: the dataset's CoOp template; ``promptsrc`` (alias
    ``ensemble``): PromptSRC's 60 templates; ``imagenet_select``: CoOp's 7-template ImageNet ensemble.
    """
    key = name.lower()
    if key == "single":
        return [DEFAULT_TEMPLATE]
    if key == "coop":
        return [coop_template(dataset)]
    if key in ("promptsrc", "ensemble"):
        return list(PROMPTSRC_TEMPLATES)
    if key == "imagenet_select":
        return list(IMAGENET_TEMPLATES_SELECT)
    raise ValueError(f"unknown template set {name!r}; use one of {', '.join(TEMPLATE_SETS)}")


def fill(template: str, class_name: str) -> str:
    """The prompt for one class: ``{}`` replaced by the name after CoOp's clean-up (``_`` -> space)."""
    from promptkd.data.benchmarks import prompt_name

    return template.replace("{}", prompt_name(class_name))
