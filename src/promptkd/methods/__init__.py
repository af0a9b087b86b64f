"""Learning methods built on the backbone interface: zero-shot, PromptSRC/IVLP/CoOp, PromptKD."""
