"""``promptkd train-teacher`` (stage 1: PromptSRC/IVLP/CoOp prompts on few-shot labelled data) and
``promptkd convert-teacher`` (the authors' released Dassl checkpoints -> our teacher artefact).

Both only parse arguments: :func:`promptkd.stages.train_teacher` and
:func:`promptkd.methods.teacher_io.convert_dassl_teacher` do the work."""

from __future__ import annotations

import argparse

from promptkd.cli.common import add_run_options, preset_note, settings_help


def register(subparsers: argparse._SubParsersAction) -> None:
    from promptkd.data.custom import DATA_ROOT_HELP, DATASET_HELP

    train = subparsers.add_parser(
        "train-teacher", formatter_class=settings_help("promptkd.stages.teacher:TeacherSettings", "config keys for --set KEY=VALUE",
                                                "EXCLUDE", preset_note),
        help="stage 1: learn the teacher's prompts (PromptSRC) on few-shot labelled data",
        description="Train the teacher's prompts (PromptSRC by default; IVLP and CoOp with --set "
                    "method.method=ivlp|coop) on K shots per class of a benchmark, and save the teacher "
                    "artefact (prompts in safetensors + JSON) in --out.")
    train.add_argument("--config", default="teacher/base2novel",
                       help="YAML file or packaged preset: teacher/base2novel, teacher/imagenet_all, teacher/custom "
                            "(default %(default)s)")
    train.add_argument("--data-root", help=DATA_ROOT_HELP)
    train.add_argument("--dataset", required=True, help=DATASET_HELP)
    train.add_argument("--clip-weights", required=True, help="CLIP checkpoint of the teacher (e.g. ViT-L-14.safetensors)")
    train.add_argument("--arch", help="CLIP architecture of a bare state dict whose heads the file cannot tell "
                                      "(e.g. ViT-H-14; see `promptkd convert --help`)")
    train.add_argument("--out", required=True, help="run folder: config, logs, checkpoints and the artefact")
    add_run_options(train, seed_help="seed of the few-shot draw, initialisation and training (default 1; on "
                                     "--resume the run's own)")
    train.set_defaults(func=run_train)

    conv = subparsers.add_parser(
        "convert-teacher", help="convert the authors' Dassl teacher checkpoint to our teacher artefact",
        description="Read an authors' PromptSRC/PromptKD teacher checkpoint (model-best.pth.tar, "
                    "model.pth.tar-20 or its run folder), check it against the CLIP weights, and write a "
                    "teacher artefact (prompts in safetensors + JSON).")
    conv.add_argument("src", help="Dassl checkpoint file or folder")
    conv.add_argument("--clip-weights", required=True, help="the CLIP weights the teacher was trained from")
    conv.add_argument("--out", required=True, help="artefact folder to write")
    conv.add_argument("--class-names", help="text file, one class name per line, recorded in the artefact")
    conv.add_argument("--trust-checkpoint", action="store_true",
                      help="allow full unpickling of the checkpoint (Dassl files pickle the LR scheduler)")
    conv.add_argument("--debug", action="store_true", help="show tracebacks")
    conv.set_defaults(func=run_convert)


def run_train(args: argparse.Namespace) -> int:
    from promptkd.stages import TeacherConfig, train_teacher

    train_teacher(TeacherConfig(
        dataset=args.dataset, clip_weights=args.clip_weights, out=args.out, data_root=args.data_root,
        preset=args.config, overrides=args.overrides, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint, arch=args.arch))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from promptkd.methods.teacher_io import conversion_summary, convert_dassl_teacher, read_class_names

    names = read_class_names(args.class_names) if args.class_names else None
    out = convert_dassl_teacher(args.src, args.clip_weights, args.out, trust_checkpoint=args.trust_checkpoint,
                                class_names=names)
    print(f"convert-teacher: {conversion_summary(out)}")
    return 0
