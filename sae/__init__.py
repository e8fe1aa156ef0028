"""
Sparse autoencoders for nanochat residual streams: models, trainer, metrics, SAELens/sparsify I/O.

    from sae import load_sae
    sae = load_sae("atlas_out/saes/blocks.10.hook_resid_post")
    codes = sae.encode(resid)          # [..., d_sae], raw activations in
    x_hat = sae.decode(codes)
"""

from sae.config import ARCHITECTURES, SAEConfig, TrainConfig, layer_from_hook_name
from sae.io import load_sae, load_sparsity, save_sae, save_sparsify
from sae.metrics import SAEMetrics, batch_metrics, decoder_max_cosine, log_density_histogram
from sae.models import SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE, build_sae
from sae.trainer import SAERun, ThresholdCalibrator, geometric_median, new_run, train_sae, train_saes, train_step

__all__ = [
    "ARCHITECTURES", "SAEConfig", "TrainConfig", "layer_from_hook_name",
    "load_sae", "load_sparsity", "save_sae", "save_sparsify",
    "SAEMetrics", "batch_metrics", "decoder_max_cosine", "log_density_histogram",
    "SAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "build_sae",
    "SAERun", "ThresholdCalibrator", "geometric_median", "new_run", "train_sae", "train_saes", "train_step",
]
