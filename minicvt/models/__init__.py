"""CvT built from the layers in minicvt.nn, with the official code's names and semantics.

    from minicvt.models import build_model
    model = build_model("cvt-cifar-s", seed=0)          # logits = model.forward(x); model.backward(dlogits)
    model = minicvt.load("checkpoints/cvt-cifar-s.npz") # a trained one: model.predict(["cat.jpg"])
"""
from .attention import Attention, AvgProjection, ConvProjection
from .block import Block, Mlp
from .configs import CONFIGS, CvTConfig, get_config
from .cvt import ConvolutionalVisionTransformer, VisionTransformer, build_model
from .embed import ConvEmbed
from .io import export_state_dict, from_checkpoint, import_state_dict, load, load_weights, save
from .inputs import prepare_images, run_preprocessing
from .pretrained import PretrainedError, export_hf_state_dict, from_pretrained
from .summary import count_parameters, format_summary, stage_grids, stage_rows
