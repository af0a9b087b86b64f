"""The offline demo: PromptKD on real pretrained weights and real images, on a CPU, with nothing downloaded.

Teacher: EfficientNet-Lite2 image encoder + MiniLM text encoder; student: EfficientNet-Lite0. Each image
encoder is paired with the text encoder by a ridge map from MiniLM embeddings of the 1000 ImageNet class
names to the rows of that image model's ImageNet classifier (DeViSE-style), see ``align.py``. Data:
Fashion-MNIST. The pipeline (``pipeline.py``) runs the same stage-1/stage-2/evaluation code as CLIP.
"""
