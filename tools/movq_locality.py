# How far the MoVQ decoder spreads a change of the repainted area's latents into the kept pixels.
# Usage: VENV/bin/python tools/movq_locality.py MOVQ_DIR SAVE_DIR
# SAVE_DIR holds `kandinsky eval shapes --inpaint-n 20 --save SAVE_DIR` output (inpaint-en-NNN-input.png
# and -mask.png, 64 px, white = repainted). For each scene: the kept pixels' mean change (/255) after
# the MoVQ round trip, after replacing the repainted area's latents (every latent cell the mask
# touches) by another scene's, and by Gaussian noise of the latents' scale.
import sys, numpy as np, torch
from PIL import Image
from diffusers import VQModel
movq = VQModel.from_pretrained(sys.argv[1]).eval()
d = sys.argv[2]; n = 20
def load(p): return torch.tensor(np.asarray(Image.open(p).convert('RGB')).astype(np.float32)/127.5-1).permute(2,0,1)[None]
res = {'roundtrip': [], 'swap': [], 'noise': []}
with torch.no_grad():
  for i in range(n):
    a = load(f'{d}/inpaint-en-{i:03d}-input.png'); b = load(f'{d}/inpaint-en-{(i+7)%n:03d}-input.png')
    m = np.asarray(Image.open(f'{d}/inpaint-en-{i:03d}-mask.png').convert('L')) > 127
    za = movq.encode(a).latents; zb = movq.encode(b).latents
    lm = torch.tensor(m.reshape(16,4,16,4).any(axis=(1,3)))[None,None].float()
    def dec(z): return ((movq.decode(z, force_not_quantize=True).sample.clamp(-1,1)+1)*127.5).round()[0].permute(1,2,0).numpy()
    A = (a[0].permute(1,2,0).numpy()+1)*127.5
    k = ~m
    for name, z in [('roundtrip', za), ('swap', za*(1-lm)+zb*lm), ('noise', za*(1-lm)+torch.randn_like(za)*lm*za.std())]:
      res[name].append(np.abs(dec(z)-A)[k].mean())
for k,v in res.items():
  if v: print(k, f'{np.mean(v):.2f}')
