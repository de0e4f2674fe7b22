"""Checkpoints written by ubt_ray load with plain open_clip in a fresh process and give the same embeddings."""

import json
import subprocess
import sys

import pytest
import torch

from ubt_ray.config import ModelConfig
from ubt_ray.core.models import CONFIG_FILE, WEIGHTS_FILE
from ubt_ray.errors import UserError
from ubt_ray.models import load_clip, save_clip

PLAIN_OPEN_CLIP = """
import json, sys, torch, open_clip
path = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + path)
tok = open_clip.get_tokenizer("local-dir:" + path)
model.eval()
torch.manual_seed(0)
x = torch.rand(3, 3, 32, 32)
with torch.no_grad():
    img = model.encode_image(x)
    txt = model.encode_text(tok(["a photo of a coat.", "a bag"]))
print(json.dumps({"img": img.tolist(), "txt": txt.tolist(), "modules": sorted(m for m in sys.modules if m.startswith("ubt"))}))
"""


@pytest.mark.slow
def test_checkpoint_loads_in_fresh_process_with_only_open_clip(tmp_path):
    clip = load_clip(ModelConfig(), seed=3)
    save_clip(clip, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / CONFIG_FILE).exists() and (tmp_path / "ckpt" / WEIGHTS_FILE).exists()
    out = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(tmp_path / "ckpt")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] == []  # nothing of ours was imported
    clip.model.eval()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        img = clip.model.encode_image(x)
        txt = clip.model.encode_text(clip.tokenizer(["a photo of a coat.", "a bag"]))
    assert torch.allclose(img, torch.tensor(got["img"]), atol=1e-6)
    assert torch.allclose(txt, torch.tensor(got["txt"]), atol=1e-6)


def test_standard_name_and_bad_name():
    clip = load_clip(ModelConfig(name="RN50"), seed=0)
    assert clip.image_size == 224 and clip.model_cfg["vision_cfg"]["layers"] == [3, 4, 6, 3]
    with pytest.raises(UserError, match="model.name 'ViT-Q-99' is not an open_clip model"):
        load_clip(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(UserError, match="does not exist"):
        load_clip(ModelConfig(checkpoint="/nonexistent/ckpt"))
