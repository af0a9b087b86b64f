"""promptkd: unsupervised prompt distillation (PromptKD, CVPR 2024) for vision-language models.

Stage 1 teaches a big prompted teacher from a few labelled images; its class vectors are stored once;
stage 2 distils a small prompted student from unlabelled images by matching the teacher's logits.
"""

__version__ = "0.1.0"
