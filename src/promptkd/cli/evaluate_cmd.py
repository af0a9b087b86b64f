"""``promptkd evaluate``: one model on one dataset under one protocol -> results.json, a table, per-class CSV.

The three model kinds go through the same code: image features of every test image (computed once)
against class vectors. zeroshot: frozen CLIP with its text tower's vectors (--clip-weights);
teacher: a teacher artefact, class vectors from its prompted text tower (--artefact);
student: a student artefact or bundle with the class vectors it carries (--artefact).
:func:`promptkd.stages.evaluate_model` does the work."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATA_ROOT_HELP, DATASET_HELP
    from promptkd.stages.evaluation import MODELS, TEMPLATES

    p = subparsers.add_parser("evaluate", help="evaluate zero-shot CLIP, a teacher or a student (base2novel, "
                              "cross_dataset, domain_generalization)", description=__doc__)
    p.add_argument("--model", required=True, choices=MODELS, help="which kind of model")
    p.add_argument("--artefact", metavar="PATH", help="teacher or student artefact folder (student: or bundle)")
    p.add_argument("--clip-weights", metavar="FILE",
                   help="zeroshot: the CLIP checkpoint; teacher/student: use this file instead of the recorded path")
    p.add_argument("--arch", help="zeroshot: CLIP architecture of a bare state dict (e.g. ViT-H-14)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling a legacy CLIP checkpoint named here (only for files you trust)")
    p.add_argument("--templates", choices=TEMPLATES, default="coop",
                   help="zeroshot prompts: the dataset's CoOp template (default, as the paper's CLIP rows), "
                        "'a photo of a {}.', PromptSRC's 60 templates or CoOp's 7 ImageNet templates")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--protocol", required=True, choices=("base2novel", "cross_dataset", "domain_generalization"),
                   help="the paper's protocol (base2novel: base/novel/HM; the others: accuracy)")
    p.add_argument("--seed", type=int, default=None,
                   help="the run's seed, recorded in results.json (default: the seed the artefact was trained with; "
                        "1 for zeroshot); another seed than the artefact's is refused")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for results.json, results.md, per_class.csv")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto (default): bf16 only on a device with native bf16 and when it agrees "
                        "with fp32 on the top-1 class of >= 99.5%% of the first 256 test images, else fp32")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="larger test images are refused (JPEGs decoded smaller); default Pillow's 89,478,485")
    p.add_argument("--tensorboard", action="store_true", help="also write the metrics as TensorBoard scalars (OUT/tensorboard)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from promptkd.stages import EvaluateConfig, evaluate_model

    result = evaluate_model(EvaluateConfig(
        model=args.model, dataset=args.dataset, protocol=args.protocol, out=args.out, artefact=args.artefact,
        clip_weights=args.clip_weights, data_root=args.data_root, templates=args.templates, seed=args.seed,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        trust_checkpoint=args.trust_checkpoint, arch=args.arch, tensorboard=args.tensorboard,
        max_image_pixels=args.max_image_pixels))
    print(result.summary)
    return 0
