"""``promptkd evaluate``: one model on one dataset under one protocol -> results.json, a table, per-class CSV.

The three model kinds go through the same code: image features of every test image (computed once)
against class vectors. zeroshot: frozen CLIP with its text tower's vectors (--clip-weights);
teacher: a teacher artefact, class vectors from its prompted text tower (--artefact);
student: a student artefact or bundle with the class vectors it carries (--artefact)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATA_ROOT_HELP, DATASET_HELP

    p = subparsers.add_parser("evaluate", help="evaluate zero-shot CLIP, a teacher or a student (base2novel, "
                              "cross_dataset, domain_generalization)", description=__doc__)
    p.add_argument("--model", required=True, choices=("zeroshot", "teacher", "student"))
    p.add_argument("--artefact", metavar="PATH", help="teacher or student artefact folder (student: or bundle)")
    p.add_argument("--clip-weights", metavar="FILE",
                   help="zeroshot: the CLIP checkpoint; teacher/student: use this file instead of the recorded path")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling a legacy CLIP checkpoint (only for files you trust)")
    p.add_argument("--templates", choices=("coop", "single", "promptsrc", "imagenet_select"), default="coop",
                   help="zeroshot prompts: the dataset's CoOp template (default, as the paper's CLIP rows), "
                        "'a photo of a {}.', PromptSRC's 60 templates or CoOp's 7 ImageNet templates")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument("--protocol", required=True, choices=("base2novel", "cross_dataset", "domain_generalization"))
    p.add_argument("--seed", type=int, default=1, help="the run's seed, recorded in results.json (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for results.json, results.md, per_class.csv")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    from promptkd.data.benchmarks import load_benchmark
    from promptkd.evaluate import (
        check_protocol_dataset,
        evaluate_benchmark,
        student_classifier,
        summary_line,
        teacher_classifier,
        write_results,
        zeroshot_classifier,
    )

    device = resolve_device(args.device)
    bench = load_benchmark(args.data_root, args.dataset)
    check_protocol_dataset(args.protocol, bench)  # before loading any model
    options = {"trust_checkpoint": True} if args.trust_checkpoint else {}
    if args.model == "zeroshot":
        if not args.clip_weights:
            raise ValueError("--model zeroshot needs --clip-weights FILE")
        if args.artefact:
            raise ValueError("--model zeroshot takes --clip-weights, not --artefact")
        clf = zeroshot_classifier(args.clip_weights, bench, device=device, templates=args.templates, **options)
    else:
        if not args.artefact:
            raise ValueError(f"--model {args.model} needs --artefact PATH")
        if args.clip_weights:
            options["weights"] = args.clip_weights
        if args.model == "teacher":
            clf = teacher_classifier(args.artefact, bench.classnames, device=device, **options)
        else:
            clf = student_classifier(args.artefact, device=device, **options)
    result = evaluate_benchmark(clf, bench, args.protocol, seed=args.seed, batch_size=args.batch_size,
                                num_workers=args.workers, device=device, precision=args.precision,
                                progress=sys.stderr.isatty())
    paths = write_results(result, args.out)
    print(summary_line(result))
    print(f"wrote {paths['json']}, {paths['table'].name}, {paths['per_class'].name}", file=sys.stderr)
    return 0
