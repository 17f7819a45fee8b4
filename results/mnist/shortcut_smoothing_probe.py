"""CPU probe (issue 12, session 7): relative RMSE of every decoder conv_shortcut output vs FP32 under 4-bit
activation quantization of its input: one per-tensor MSFP quantizer on the whole input ("tensor"), per-input-channel
scales ("perchan", the best any per-channel scheme can do, not an integer-GEMM format), SmoothQuant-style scales
s_c = amax_x^a / amax_w^(1-a) folded into the conv weight ("smooth<a>", exact in float); "+W4": the (rescaled) weight
quantized per output channel at 4 bits. Inputs: mnist-uncond FP32, 16 DDIM-25 trajectories, seed 0.

  nice -n 5 .venv/bin/python results/mnist/shortcut_smoothing_probe.py > results/mnist/shortcut_smoothing_probe.txt

Each line: layer, input channels, the range of the per-channel absmax, the relative RMSEs ("W4 only": float input).
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from msfp_compiler.load import load_model
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.formats import parse_format
from msfp_compiler.search import search_scale
torch.manual_seed(0)
L = load_model(__import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "mnist-uncond"); unet = L.unet.float().eval()
ACT = [parse_format(f) for f in ("e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0")]
WF = [parse_format(f) for f in ("e1m2", "e2m1", "e3m0")]
caps = {}
def hook(name):
    def f(m, inp, out):
        caps.setdefault(name, []).append(inp[0].detach())
    return f
convs = {}
for n, m in unet.named_modules():
    if n.startswith("up_blocks") and n.endswith("conv_shortcut"):
        m.register_forward_hook(hook(n)); convs[n] = m
sched = make_scheduler("ddim", L.scheduler_config); sched.set_timesteps(25)
x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in sched.timesteps:
        e = unet(x, t).sample; x = sched.step(e, t, x).prev_sample
def best_q(v, fmts):  # v: [n] values; returns fake-quant function
    best = None
    for f in fmts:
        r = search_scale(f, v)
        if best is None or r.total_mse < best[0]:
            best = (r.total_mse, f, r.scale, r.zero_point)
    _, f, s, z = best
    return lambda y: z + f.round_to_grid((y - z) / s) * s
def sub(v, n=200000):
    v = v.flatten()
    return v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(1))[:n]]
def wq(W):  # per out channel
    W2 = W.reshape(W.shape[0], -1); best = None
    for f in WF:
        r = search_scale(f, W2)
        q = f.round_to_grid(W2 / r.scale[:, None]) * r.scale[:, None]
        err = (q - W2).pow(2).sum()
        if best is None or err < best[0]: best = (err, q)
    return best[1].reshape(W.shape)
for name, m in convs.items():
    X = torch.cat(caps[name])  # [N, C, H, W]
    C = X.shape[1]
    W = m.weight.detach(); b = m.bias.detach()
    ref = torch.nn.functional.conv2d(X, W, b)
    rms = ref.pow(2).mean().sqrt()
    def err(Xq, Wq):
        return float((torch.nn.functional.conv2d(Xq, Wq, b) - ref).pow(2).mean().sqrt() / rms)
    amax = X.abs().amax(dim=(0, 2, 3))
    res = {}
    # per-tensor whole cat
    q = best_q(sub(X), ACT); res["tensor"] = err(q(X), W)
    Wq = wq(W); res["tensor+W4"] = err(q(X), Wq)
    res["W4 only"] = err(X, Wq)
    # per-channel act quant (upper bound), float and W4
    Xc = torch.empty_like(X)
    for c in range(C):
        Xc[:, c] = best_q(sub(X[:, c]), ACT)(X[:, c])
    res["perchan"] = err(Xc, W); res["perchan+W4"] = err(Xc, Wq)
    for a in (0.5, 0.75, 1.0):
        wmax = W.abs().amax(dim=(0, 2, 3)).clamp_min(1e-8)
        s = (amax.clamp_min(1e-5) ** a / wmax ** (1 - a)); s = s / s.mean() if a < 1 else s
        Xs = X / s[None, :, None, None]
        q = best_q(sub(Xs), ACT)
        Ws = W * s[None, :, None, None]
        res[f"smooth{a}"] = err(q(Xs) * s[None, :, None, None], W)
        res[f"smooth{a}+W4"] = err(q(Xs), wq(Ws))
    print(name, C, "amax range %.2f..%.2f" % (amax.min(), amax.max()), {k: round(v, 4) for k, v in res.items()}, flush=True)
