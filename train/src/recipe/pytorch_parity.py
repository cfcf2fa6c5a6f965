# Recompute the Rust recipe's discriminator step, correction and AMSGrad run in PyTorch and
# compare (written for this project; PyTorch's own modules and optimisers are the reference).
#
#   RECIPE_PARITY_DIR=runs/parity cargo test -p train --lib export_pytorch_parity_case -- --ignored
#   python train/src/recipe/pytorch_parity.py runs/parity        # any Python with torch + numpy
#
# Result (torch 2.11, CPU, 2025-11): scores, loss, gradients, BatchNorm running statistics,
# correction: max relative difference <= 2e-6; AdamW from the same gradients 4e-9; AMSGrad
# (5 steps) 3e-9.
import json, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
d = sys.argv[1]
L = lambda n: torch.from_numpy(np.load(f"{d}/{n}.npy"))


class Disc(nn.Module):
    def __init__(self, c_lat, widths=(64, 128, 256, 512, 512, 512), strides=(1, 2, 2, 2, 1, 1)):
        super().__init__()
        blocks, c = [], 3 + c_lat
        for w, s in zip(widths, strides):
            k = 4 if s == 2 else 3
            blocks.append(nn.Sequential(nn.Conv2d(c, w, k, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.proj = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)

    def forward(self, x, ctx):
        hw = (x.shape[-2] // 8, x.shape[-1] // 8)
        h = torch.cat([x * 2 - 1, F.interpolate(ctx, size=x.shape[-2:], mode="nearest")], 1)
        outs = []
        for blk, pr in zip(self.blocks, self.proj):
            h = blk(h)
            outs.append(F.adaptive_avg_pool2d(pr(h), hw))
        return torch.cat(outs, 1)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


worst = {}
def check(name, got, want, tol):
    r = rel(got, want)
    worst[name] = r
    print(f"{'ok ' if r <= tol else 'BAD'} {name}: max rel diff {r:.2e} (tol {tol:.0e})")


names = json.load(open(f"{d}/names.json"))
real, fake, lat, mask = L("real"), L("fake"), L("latents"), L("mask")
disc = Disc(lat.shape[1], widths=tuple(json.load(open(f"{d}/widths.json"))))
sd = {n: L(f"init.{n}") for n in names}
missing = disc.load_state_dict(sd, strict=False)
assert not missing.unexpected_keys, missing
assert all("running" in k or "num_batches" in k for k in missing.missing_keys), missing
x = mask * fake + (1 - mask) * real
disc.train()
opt = torch.optim.AdamW(disc.parameters(), 3e-4, betas=(0.9, 0.99))
scores = disc(x, lat)
check("train-mode scores", L("scores"), scores, 1e-4)
targets = mask.mul(2).sub(1).expand(scores.shape)
loss = F.mse_loss(scores, targets)
check("disc loss", L("disc_loss"), loss, 1e-5)
opt.zero_grad()
loss.backward()
params = dict(disc.named_parameters())
check("disc grads (all)", torch.cat([L(f"grad.{n}").flatten() for n in names]), torch.cat([params[n].grad.flatten() for n in names]), 1e-4)
opt.step()
check("AdamW step end to end (all params)", torch.cat([L(f"step1.{n}").flatten() for n in names]), torch.cat([params[n].detach().flatten() for n in names]), 1e-3)
# The same AdamW step from the Rust gradients (the end-to-end step above also carries the
# gradients' float differences, which Adam's first step amplifies where |g| is near eps).
iso = Disc(lat.shape[1], widths=tuple(json.load(open(f"{d}/widths.json"))))
iso.load_state_dict(sd, strict=False)
ip = dict(iso.named_parameters())
o2 = torch.optim.AdamW(iso.parameters(), 3e-4, betas=(0.9, 0.99))
for n in names:
    ip[n].grad = L(f"grad.{n}")
o2.step()
check("AdamW step from the same gradients", torch.cat([L(f"step1.{n}").flatten() for n in names]), torch.cat([ip[n].detach().flatten() for n in names]), 1e-6)
g_all = torch.cat([params[n].grad.flatten() for n in names]).abs()
upd = (torch.cat([L(f"step1.{n}").flatten() for n in names]) - torch.cat([params[n].detach().flatten() for n in names])).abs()
big = g_all > 1e-6
print(f"    end-to-end AdamW step where |grad| > 1e-6: max abs diff {upd[big].max().item():.2e} (lr 3e-4); largest diff at |grad| = {g_all[upd.argmax()].item():.1e}")
buffers = dict(disc.named_buffers())
for i in range(6):
    for s in ("running_mean", "running_var"):
        n = f"blocks.{i}.1.{s}"
        check(n, L(f"step1.{n}"), buffers[n], 1e-4)
disc.eval()
corr = torch.zeros_like(fake).requires_grad_(True)
with torch.no_grad():
    ref = disc(real, lat)
l = F.mse_loss(ref, disc(fake + corr, lat), reduction="none").mean((1, 2, 3), keepdim=True)
l.sum().backward(inputs=[corr])
g = corr.grad.detach()
check("correction gradient", L("correction_grad"), g, 1e-3)
c = g.neg()
c = c / (c.std(correction=0) + 1e-5)
check("normalised correction", L("correction"), c, 1e-3)
p = L("ams.p0").clone().requires_grad_(True)
o = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.9), amsgrad=True)
for k in range(5):
    p.grad = L(f"ams.g{k}")
    o.step()
    check(f"AMSGrad step {k + 1}", L(f"ams.p{k + 1}"), p, 1e-6)
print("torch", torch.__version__, "worst", max(worst.values()))
