"""The clean-room SD/SDXL 2D VAE (opensora/autoencoder_kl.py). Its outputs against the official OpenSora code are
checked by the golden VAE tests (test_vae.py); these pin its configuration rules, shapes and posterior."""

from __future__ import annotations

import pytest
import torch

from comfyui_chai.opensora.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from comfyui_chai.opensora.vae import SDXL_VAE_CONFIG
from comfyui_chai.pipeline.builders import TINY_VAE_SPATIAL_CONFIG


def test_the_sdxl_layout_has_the_checkpoint_names_and_the_tiny_one_round_trips_shapes():
    with torch.device("meta"):
        sdxl = AutoencoderKL(SDXL_VAE_CONFIG)
    sd = sdxl.state_dict()
    assert len(sd) == 248 and sdxl.config.latent_channels == 4 and sdxl.config["block_out_channels"] == [128, 256, 512, 512]
    assert tuple(sd["decoder.mid_block.attentions.0.to_out.0.weight"].shape) == (512, 512)
    assert tuple(sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape) == (256, 128, 1, 1)
    assert tuple(sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in sd  # the last level does not resample
    assert list(sd).index("decoder.up_blocks.0.resnets.0.norm1.weight") < list(sd).index("decoder.mid_block.attentions.0.group_norm.weight")
    torch.manual_seed(0)
    tiny = AutoencoderKL(TINY_VAE_SPATIAL_CONFIG).eval()
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x).latent_dist
        assert posterior.mode().shape == (2, 4, 4, 3)
        assert tiny.decode(posterior.mode()).sample.shape == (2, 3, 32, 24)


def test_the_posterior_clamps_the_log_variance_and_draws_from_the_generator():
    mean = torch.zeros(1, 2, 2, 2)
    logvar = torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    dist = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert dist.logvar.min() == -30.0 and dist.logvar.max() == 20.0 and torch.equal(dist.mode(), mean)
    a = dist.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, dist.std * noise)


@pytest.mark.parametrize("change, word", [({"act_fn": "gelu"}, "act_fn"),
                                          ({"down_block_types": ["DownBlock2D"] * 4}, "down_block_types"),
                                          ({"block_out_channels": [128, 100, 512, 512]}, "norm_num_groups"),
                                          ({"layers_per_block": 0}, "layers_per_block")])
def test_an_architecture_other_than_the_sd_vae_is_refused_by_name(change, word):
    with pytest.raises(ValueError, match=word):
        AutoencoderKL({**SDXL_VAE_CONFIG, **change})
