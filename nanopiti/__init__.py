"""nanopiti: a minimal, readable PyTorch implementation of PITI (Pretraining is All You Need for
Image-to-Image Translation). See README.md for the map from the paper to the files."""

from .model import GlideText, ModelError, PITI, base_config, build_model, infer_config, load_model, toy_config

__all__ = ["GlideText", "ModelError", "PITI", "base_config", "build_model", "infer_config", "load_model", "toy_config"]
