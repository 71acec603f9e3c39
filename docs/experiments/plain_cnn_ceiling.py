"""How much a plain restoration CNN gains over bicubic on the demo evaluation (issue 3, acceptance 5).

    PYTHONPATH=. python docs/experiments/plain_cnn_ceiling.py --steps 2000 --tag A
    PYTHONPATH=. python docs/experiments/plain_cnn_ceiling.py --steps 4000 --lr 5e-4 --tag C

A one-off measurement, not part of the package: the numbers it printed on 2026-11-27 (2-core CPU, one
thread, commit 5ce19a2) are in docs/design/training.md, "Seventh session".
"""
import argparse
import time
import torch, torch.nn as nn, torch.nn.functional as F
from guidesr.data import SampleImages, TrainingPairs, PairConfig
from guidesr.evaluate import evaluation_set
from guidesr.metrics import psnr
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=2000); p.add_argument("--ch", type=int, default=64)
p.add_argument("--blocks", type=int, default=8); p.add_argument("--bs", type=int, default=16)
p.add_argument("--crop", type=int, default=96); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--threads", type=int, default=1); p.add_argument("--extra", default="")
p.add_argument("--loss", default="mse"); p.add_argument("--tag", default="a")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
class Block(nn.Module):
    def __init__(s, c):
        super().__init__(); s.c1 = nn.Conv2d(c, c, 3, padding=1); s.c2 = nn.Conv2d(c, c, 3, padding=1)
    def forward(s, x): return x + s.c2(F.relu(s.c1(x)))
class Net(nn.Module):
    def __init__(s, c, n):
        super().__init__(); s.head = nn.Conv2d(48, c, 3, padding=1)
        s.body = nn.Sequential(*[Block(c) for _ in range(n)]); s.tail = nn.Conv2d(c, 48, 3, padding=1)
        nn.init.zeros_(s.tail.weight); nn.init.zeros_(s.tail.bias)
    def forward(s, x):
        h = s.head(F.pixel_unshuffle(x, 4)); return x + F.pixel_shuffle(s.tail(s.body(h)), 4)
net = Net(a.ch, a.blocks)
images = list(SampleImages("train"))
if a.extra:
    import skimage.data as sd, numpy as np
    for name in a.extra.split(","):
        im = getattr(sd, name)(); im = np.asarray(im)
        if im.ndim == 2: im = np.stack([im]*3, -1)
        images.append(torch.from_numpy(im[..., :3].copy()).permute(2, 0, 1).float() / 255)
print("images", len(images), flush=True)
pairs = TrainingPairs(images, PairConfig(batch_size=a.bs, crop_size=a.crop, seed=0))
names, lq, hr = evaluation_set("sample", 256, 0, 4)
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.05)
def ev():
    with torch.no_grad():
        out = net(lq).clamp(-1, 1)
    f = lambda o: sum(psnr((o[i:i+1]+1)/2, (hr[i:i+1]+1)/2, crop=4) for i in range(len(hr))) / len(hr)
    return f(out), f(lq.clamp(-1, 1))
t0 = time.time(); run = 0
for step in range(1, a.steps + 1):
    x, y = next(pairs)
    out = net(x)
    loss = F.mse_loss(out, y) if a.loss == "mse" else F.l1_loss(out, y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    run = 0.98 * run + 0.02 * loss.item()
    if step % 250 == 0 or step == a.steps:
        m, b = ev()
        print(f"{a.tag} step {step} loss {run:.4f} model {m:.2f} bic {b:.2f} gain {m-b:+.2f} t {time.time()-t0:.0f}s",
              flush=True)
